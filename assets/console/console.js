// Live command statuses on a device page: while a command on the page is pending, ask the
// broker every two seconds how the device's commands stand and update the table in place.
// Everything works without this script; it only spares a reload.
(function () {
  'use strict';
  var table = document.getElementById('commands');
  if (!table || !window.fetch) { return; }
  var url = table.getAttribute('data-live');
  var pendingStatuses = ['queued', 'sent', 'not-now'];
  function pending() {
    var spans = table.querySelectorAll('[data-status]');
    for (var i = 0; i < spans.length; i++) {
      if (pendingStatuses.indexOf(spans[i].textContent.trim()) >= 0) { return true; }
    }
    return false;
  }
  function apply(commands) {
    commands.forEach(function (c) {
      var row = document.getElementById('command-' + c.uuid);
      if (!row) { return; }
      var status = row.querySelector('[data-status]');
      if (status && status.textContent.trim() !== c.status) {
        status.textContent = c.status;
        status.className = 'status ' + c.status;
      }
      var answered = row.querySelector('[data-answered]');
      if (answered) { answered.textContent = c.answered_at; }
      var detail = row.querySelector('[data-detail]');
      if (detail) { detail.textContent = c.detail; }
      // Answered: nothing left to cancel (a reload offers re-send).
      var cancel = row.querySelector('[data-cancel]');
      if (cancel && !c.pending) { cancel.hidden = true; }
    });
  }
  function poll() {
    if (!pending()) { return; }
    fetch(url, { credentials: 'same-origin', headers: { 'Accept': 'application/json' } })
      .then(function (r) {
        if (r.status === 401) { throw new Error('signed out'); }
        return r.json();
      })
      .then(function (body) { apply(body.commands || []); setTimeout(poll, 2000); })
      .catch(function () { /* signed out or offline: stop; a reload shows the truth */ });
  }
  setTimeout(poll, 2000);
})();
