//! The console's pages and actions. Each handler reads through the store's capability methods,
//! checks the admin's grant on the server before acting (whatever the page showed), and
//! audits what it did under the admin's name.

use askama::Template;
use axum::Extension;
use axum::Form;
use axum::Json;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::chart::{self, Chart, Series};
use super::grants::Need;
use super::{SignedIn, internal, problem, render};
use crate::admin::scope::Scope;
use crate::apple::commands::{self, Command};
use crate::audit::{OUTCOME_FAILURE, OUTCOME_SUCCESS};
use crate::http::AppState;
use crate::store::{
    AuditSearch, ChannelStatus, CommandRecord, CommandStatus, DeviceFilter, MdmEnrollment,
    NewCommand, PushStatus, Queued, RetireRequest,
};

/// What every signed-in page shows around its content.
pub struct Chrome {
    pub name: String,
    pub csrf: String,
    /// Which section is current (`overview`, `devices`, `audit`).
    pub section: &'static str,
    pub devices: bool,
    pub people: bool,
    pub policies: bool,
    pub tokens: bool,
    pub audit: bool,
}

impl Chrome {
    pub(super) fn of(admin: &SignedIn, section: &'static str) -> Chrome {
        Chrome {
            name: admin.session.name.clone(),
            csrf: admin.session.csrf.clone(),
            section,
            devices: admin.allows(Need::Scope(Scope::DevicesRead)),
            people: admin.allows(Need::Scope(Scope::UsersRead)),
            policies: admin.allows(Need::Scope(Scope::PoliciesRead)),
            tokens: admin.allows(Need::Scope(Scope::TokensRead)),
            audit: admin.allows(Need::Scope(Scope::AuditRead)),
        }
    }

    /// `aria-current` for a navigation link.
    pub fn current(&self, section: &str) -> &'static str {
        if self.section == section {
            "page"
        } else {
            "false"
        }
    }
}

#[derive(Template)]
#[template(path = "console/sign_in.html")]
pub struct SignInPage<'a> {
    pub providers: Vec<super::ProviderChoice>,
    pub csrf: &'a str,
    pub error: Option<&'a str>,
    /// Whether any group may use the console at all.
    pub configured: bool,
}

#[derive(Template)]
#[template(path = "console/problem.html")]
pub struct ProblemPage<'a> {
    pub title: &'a str,
    pub message: &'a str,
    pub signed_in: bool,
}

pub(super) fn when(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M UTC").to_string()
}

fn when_opt(at: &Option<DateTime<Utc>>) -> String {
    at.as_ref().map_or_else(|| "—".to_owned(), when)
}

/// The platform a product name (`iPhone15,2`, `MacBookPro18,1`) belongs to.
fn platform(product: Option<&str>) -> &'static str {
    let Some(product) = product else {
        return "Unknown";
    };
    if product.starts_with("iPhone") {
        "iPhone"
    } else if product.starts_with("iPad") {
        "iPad"
    } else if product.starts_with("Mac") || product.starts_with("iMac") {
        "Mac"
    } else if product.starts_with("AppleTV") {
        "Apple TV"
    } else if product.starts_with("Watch") {
        "Apple Watch"
    } else if product.starts_with("RealityDevice") {
        "Vision"
    } else {
        "Other"
    }
}

fn status_name(status: Option<ChannelStatus>) -> &'static str {
    status.map_or("not checked in", |s| s.as_str())
}

// ---------------------------------------------------------------------------------------------
// Overview

#[derive(Template)]
#[template(path = "console/overview.html")]
pub struct OverviewPage {
    pub chrome: Chrome,
    pub readable: bool,
    pub total: i64,
    /// Status, devices, and the status filter's value (empty when it cannot be filtered on).
    pub by_status: Vec<(String, i64, String)>,
    pub by_platform: Vec<(String, i64)>,
    pub check_ins: Chart,
    pub outcomes: Chart,
    pub warnings: Vec<String>,
}

pub async fn overview(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
) -> Response {
    let chrome = Chrome::of(&admin, "overview");
    // Whole seconds, as stored: the charts' hours are counted in the database from it.
    let now = crate::store::now();
    let empty = |id, title| chart::hourly(id, title, now, &[], []);
    if !admin.allows(Need::Scope(Scope::DevicesRead)) {
        return render(
            StatusCode::OK,
            &OverviewPage {
                chrome,
                readable: false,
                total: 0,
                by_status: Vec::new(),
                by_platform: Vec::new(),
                check_ins: empty("check-ins", "Check-ins"),
                outcomes: empty("outcomes", "Command outcomes"),
                warnings: Vec::new(),
            },
        );
    }
    let counts = match state.store.console_device_counts().await {
        Ok(counts) => counts,
        Err(e) => return internal(&e),
    };
    let mut by_status = std::collections::BTreeMap::<String, i64>::new();
    let mut by_platform = std::collections::BTreeMap::<String, i64>::new();
    for c in &counts {
        *by_status
            .entry(status_name(c.status).to_owned())
            .or_default() += c.count;
        *by_platform
            .entry(platform(c.product_name.as_deref()).to_owned())
            .or_default() += c.count;
    }
    let total = counts.iter().map(|c| c.count).sum();
    // Counted per hour in the database: a day of a large fleet is never read row by row.
    let check_ins = match state.store.console_check_ins_by_hour(now).await {
        Ok(rows) => {
            let mut counts = chart::Counts::new(1);
            for (age, count) in rows {
                counts.add(age, 0, u64::try_from(count).unwrap_or(0));
            }
            chart::drawn(
                "check-ins",
                "Check-ins per hour",
                &[Series {
                    name: "channels seen",
                    class: "seen",
                }],
                counts,
            )
        }
        Err(e) => return internal(&e),
    };
    let answered = match state.store.console_outcomes_by_hour(now).await {
        Ok(answered) => answered,
        Err(e) => return internal(&e),
    };
    // Every failure answered since a day ago (the rows the database numbered -1 and 24 too).
    let failed: i64 = answered
        .iter()
        .filter(|(_, s, _)| matches!(s, CommandStatus::Error | CommandStatus::FormatError))
        .map(|(_, _, count)| count)
        .sum();
    let mut outcome_counts = chart::Counts::new(3);
    for (age, status, count) in answered {
        let which = match status {
            CommandStatus::Acknowledged => 0,
            CommandStatus::NotNow => 1,
            CommandStatus::Error | CommandStatus::FormatError => 2,
            _ => continue,
        };
        outcome_counts.add(age, which, u64::try_from(count).unwrap_or(0));
    }
    let outcomes = chart::drawn(
        "outcomes",
        "Command outcomes per hour",
        &[
            Series {
                name: "acknowledged",
                class: "ok",
            },
            Series {
                name: "not now",
                class: "later",
            },
            Series {
                name: "failed",
                class: "bad",
            },
        ],
        outcome_counts,
    );
    let mut warnings = Vec::new();
    match crate::apple::push_cert::expiry_status(&state.store).await {
        Ok(Some(push)) => warnings.extend(push.warning),
        Ok(None) => warnings.push(
            "No APNs push certificate is imported: devices cannot enroll or be woken.".to_owned(),
        ),
        Err(e) => tracing::warn!(error = %e, "console: push certificate status"),
    }
    if let Some(left) = ca_days_left(&state) {
        if left < 0 {
            warnings.push("The CA certificate has expired: devices cannot renew.".to_owned());
        } else if left < 90 {
            warnings.push(format!(
                "The CA certificate expires in {left} day(s): plan its replacement."
            ));
        }
    }
    match state
        .store
        .console_identities_expiring(now + chrono::Duration::days(14))
        .await
    {
        Ok(0) => {}
        Ok(n) => warnings.push(format!(
            "{n} device(s) hold an identity certificate that expires within 14 days."
        )),
        Err(e) => return internal(&e),
    }
    if failed > 0 {
        warnings.push(format!(
            "{failed} command(s) failed on devices in the last 24 hours."
        ));
    }
    render(
        StatusCode::OK,
        &OverviewPage {
            chrome,
            readable: true,
            total,
            by_status: by_status
                .into_iter()
                .map(|(name, count)| {
                    let filter = name
                        .parse::<ChannelStatus>()
                        .map(|s| s.as_str().to_owned())
                        .unwrap_or_default();
                    (name, count, filter)
                })
                .collect(),
            by_platform: by_platform.into_iter().collect(),
            check_ins,
            outcomes,
            warnings,
        },
    )
}

/// Days until the CA certificate expires (negative once it has).
fn ca_days_left(state: &AppState) -> Option<i64> {
    use der::Decode;
    let cert = x509_cert::Certificate::from_der(&state.ca.ca.certificate_der).ok()?;
    let not_after = cert
        .tbs_certificate()
        .validity()
        .not_after
        .to_unix_duration()
        .as_secs();
    let left = i64::try_from(not_after).ok()? - Utc::now().timestamp();
    Some(left.div_euclid(86_400))
}

// ---------------------------------------------------------------------------------------------
// Devices

#[derive(Debug, Default, Deserialize)]
pub struct DeviceQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    owner: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    status: String,
    /// `1h`, `24h`, `7d`, `30d`, or empty.
    #[serde(default)]
    seen: String,
}

pub struct DeviceLine {
    pub udid: String,
    pub href: String,
    pub name: String,
    pub serial: String,
    pub model: String,
    pub os: String,
    pub owner: String,
    pub status: &'static str,
    pub last_seen: String,
}

#[derive(Template)]
#[template(path = "console/devices.html")]
pub struct DevicesPage {
    pub chrome: Chrome,
    pub q: String,
    pub owner: String,
    pub group: String,
    pub status: String,
    pub seen: String,
    pub statuses: Vec<&'static str>,
    pub seen_choices: Vec<(&'static str, &'static str)>,
    pub devices: Vec<DeviceLine>,
    pub full: bool,
}

const DEVICE_PAGE: u32 = 200;

/// What a path segment must escape: everything but RFC 3986's unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `text` escaped for a path segment or a query value.
pub(super) fn segment(text: &str) -> String {
    utf8_percent_encode(text, SEGMENT).to_string()
}

pub(super) fn device_href(udid: &str) -> String {
    format!("/admin/devices/{}", segment(udid))
}

pub(super) fn bounded(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty()).then(|| crate::audit::truncated(text, 256))
}

pub async fn devices(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    query: Result<Query<DeviceQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(refused) = admin
        .require(
            &state,
            Need::Scope(Scope::DevicesRead),
            "console.devices",
            None,
        )
        .await
    {
        return refused;
    }
    let Query(query) = query.unwrap_or_default();
    let status = query.status.parse::<ChannelStatus>().ok();
    let seen_since = match query.seen.as_str() {
        "1h" => Some(Utc::now() - chrono::Duration::hours(1)),
        "24h" => Some(Utc::now() - chrono::Duration::hours(24)),
        "7d" => Some(Utc::now() - chrono::Duration::days(7)),
        "30d" => Some(Utc::now() - chrono::Duration::days(30)),
        _ => None,
    };
    let filter = DeviceFilter {
        text: bounded(&query.q),
        owner: bounded(&query.owner),
        group: bounded(&query.group),
        status,
        seen_since,
        limit: DEVICE_PAGE,
    };
    let rows = match state.store.console_devices(&filter).await {
        Ok(rows) => rows,
        Err(e) => return internal(&e),
    };
    let full = rows.len() == DEVICE_PAGE as usize;
    let devices = rows
        .into_iter()
        .map(|d| DeviceLine {
            href: device_href(&d.udid),
            name: d.device_name.clone().unwrap_or_else(|| d.udid.clone()),
            serial: d.serial_number.unwrap_or_default(),
            model: d.model_name.or(d.product_name).unwrap_or_default(),
            os: d.os_version.unwrap_or_default(),
            owner: d
                .owner_name
                .or(d.owner_login)
                .or(d.owner_email)
                .unwrap_or_default(),
            status: status_name(d.status),
            last_seen: when_opt(&d.last_seen_at),
            udid: d.udid,
        })
        .collect();
    render(
        StatusCode::OK,
        &DevicesPage {
            chrome: Chrome::of(&admin, "devices"),
            status: status.map(|s| s.as_str().to_owned()).unwrap_or_default(),
            seen: query.seen.clone(),
            q: query.q,
            owner: query.owner,
            group: query.group,
            statuses: ChannelStatus::ALL.iter().map(|s| s.as_str()).collect(),
            seen_choices: vec![
                ("", "any time"),
                ("1h", "last hour"),
                ("24h", "last 24 hours"),
                ("7d", "last 7 days"),
                ("30d", "last 30 days"),
            ],
            devices,
            full,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// One device

pub struct CommandLine {
    pub uuid: String,
    pub request_type: String,
    pub status: &'static str,
    pub pending: bool,
    /// Whether the re-send button may offer it (never a wipe: that needs its form).
    pub resendable: bool,
    pub created_by: String,
    pub queued_at: String,
    pub answered_at: String,
    /// The device's error chain, or a short result.
    pub detail: String,
}

pub struct HistoryLine {
    pub id: String,
    pub status: String,
    pub started_at: String,
    pub ended: String,
}

pub struct ItemLine {
    pub item: String,
    pub kind: String,
    pub status: String,
    pub policy: String,
    pub why: String,
}

/// What the admin may do on the device page (a hidden action is also refused on the server).
pub struct Allowed {
    pub commands: bool,
    pub lock: bool,
    pub retire: bool,
}

#[derive(Template)]
#[template(path = "console/device.html")]
pub struct DevicePage {
    pub chrome: Chrome,
    pub href: String,
    pub name: String,
    pub owner: String,
    pub facts: Vec<(&'static str, String)>,
    pub inventory: Vec<(String, String)>,
    pub channels: Vec<(String, &'static str, &'static str, String)>,
    pub commands: Vec<CommandLine>,
    pub history: Vec<HistoryLine>,
    pub items: Option<Vec<ItemLine>>,
    pub allowed: Allowed,
    pub notice: Option<&'static str>,
}

#[derive(Debug, Default, Deserialize)]
pub struct DeviceNotice {
    #[serde(default)]
    done: String,
}

fn notice_text(done: &str) -> Option<&'static str> {
    Some(match done {
        "queued" => "Command queued. Its status below updates when the device answers.",
        "duplicate" => {
            "The same command is already waiting for this device; nothing new was queued."
        }
        "cancelled" => "Command cancelled.",
        "retired" => "Enrollment retired: the device can no longer reach the broker.",
        _ => return None,
    })
}

fn command_line(command: &CommandRecord) -> CommandLine {
    let detail = command
        .error_chain
        .as_deref()
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
        .map(|chain| {
            chain
                .as_array()
                .map(|errors| {
                    errors
                        .iter()
                        .filter_map(|e| {
                            e.get("LocalizedDescription")
                                .or_else(|| e.get("ErrorCode"))
                                .map(|v| v.to_string().trim_matches('"').to_owned())
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default()
        })
        .unwrap_or_default();
    CommandLine {
        uuid: command.uuid.clone(),
        request_type: command.request_type.clone(),
        status: command.status.as_str(),
        pending: matches!(
            command.status,
            CommandStatus::Queued | CommandStatus::Sent | CommandStatus::NotNow
        ),
        resendable: command.request_type != "EraseDevice",
        created_by: command.created_by.clone(),
        queued_at: when(&command.queued_at),
        answered_at: when_opt(&command.answered_at),
        detail,
    }
}

/// Inventory JSON (`{"QueryResponses": {...}}` or flat) as sorted key/value lines.
fn inventory_lines(inventory: Option<&str>) -> Vec<(String, String)> {
    let Some(value) = inventory.and_then(|t| serde_json::from_str::<Value>(t).ok()) else {
        return Vec::new();
    };
    let object = value
        .get("QueryResponses")
        .and_then(Value::as_object)
        .or_else(|| value.as_object());
    let Some(object) = object else {
        return Vec::new();
    };
    object
        .iter()
        .take(200)
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), crate::audit::truncated(&text, 300))
        })
        .collect()
}

async fn device_commands(
    state: &AppState,
    channels: &[MdmEnrollment],
) -> Result<Vec<CommandRecord>, crate::store::StoreError> {
    let mut all = Vec::new();
    for channel in channels {
        all.extend(state.store.commands_for(&channel.id, 100).await?);
    }
    all.sort_by(|a, b| b.queued_at.cmp(&a.queued_at).then(b.uuid.cmp(&a.uuid)));
    all.truncate(100);
    Ok(all)
}

pub async fn device(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    Path(udid): Path<String>,
    notice: Result<Query<DeviceNotice>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(refused) = admin
        .require(
            &state,
            Need::Scope(Scope::DevicesRead),
            "console.device",
            Some(&udid),
        )
        .await
    {
        return refused;
    }
    let device = match state.store.device(&udid).await {
        Ok(Some(device)) => device,
        Ok(None) => {
            return problem(
                StatusCode::NOT_FOUND,
                "No such device",
                "There is no enrolled device with that UDID.",
                true,
            );
        }
        Err(e) => return internal(&e),
    };
    let owner = match &device.owner_id {
        Some(id) => state.store.user(id).await.ok().flatten(),
        None => None,
    };
    let channels = match state.store.channels_of(&udid).await {
        Ok(channels) => channels,
        Err(e) => return internal(&e),
    };
    let commands = match device_commands(&state, &channels).await {
        Ok(commands) => commands,
        Err(e) => return internal(&e),
    };
    let history = match state.store.enrollment_history(&udid).await {
        Ok(history) => history,
        Err(e) => return internal(&e),
    };
    let items = if admin.allows(Need::Scope(Scope::PoliciesRead)) {
        policy_items(&state, &udid).await
    } else {
        None
    };
    let text = |v: &Option<String>| v.clone().unwrap_or_else(|| "—".to_owned());
    let facts = vec![
        ("UDID", device.udid.clone()),
        ("Serial number", text(&device.serial_number)),
        (
            "Model",
            text(&device.model_name.clone().or(device.product_name.clone())),
        ),
        ("Product", text(&device.product_name)),
        ("OS version", text(&device.os_version)),
        ("Build", text(&device.build_version)),
        ("Enrolled", when(&device.authenticated_at)),
        ("Updated", when(&device.updated_at)),
        ("Enrollment record", device.enrollment_id.clone()),
    ];
    let page = DevicePage {
        chrome: Chrome::of(&admin, "devices"),
        href: device_href(&udid),
        name: device.device_name.clone().unwrap_or_else(|| udid.clone()),
        owner: owner
            .map(|u| {
                let who = u.display_name.or(u.login).unwrap_or(u.subject);
                match u.email {
                    Some(email) => format!("{who} <{email}>"),
                    None => who,
                }
            })
            .unwrap_or_else(|| "nobody (enrolled by an admin)".to_owned()),
        facts,
        inventory: inventory_lines(device.inventory.as_deref()),
        channels: channels
            .iter()
            .map(|c| {
                (
                    c.id.clone(),
                    c.status.as_str(),
                    c.push_status.as_str(),
                    when_opt(&c.last_seen_at),
                )
            })
            .collect(),
        commands: commands.iter().map(command_line).collect(),
        history: history
            .into_iter()
            .map(|span| HistoryLine {
                id: span.id,
                status: span.status.as_str().to_owned(),
                started_at: when_opt(&span.started_at),
                ended: match (span.retired_at, span.retired_reason) {
                    (Some(at), Some(reason)) => format!("{} ({})", when(&at), reason.as_str()),
                    (Some(at), None) => when(&at),
                    _ => "—".to_owned(),
                },
            })
            .collect(),
        items,
        allowed: Allowed {
            commands: admin.allows(Need::Scope(Scope::CommandsWrite)),
            lock: admin.allows(Need::Lock),
            retire: admin.allows(Need::Scope(Scope::CertificatesWrite)),
        },
        notice: notice.ok().and_then(|Query(n)| notice_text(&n.done)),
    };
    render(StatusCode::OK, &page)
}

/// The device's policy items and why each is in its state, when policy is in use.
async fn policy_items(state: &AppState, udid: &str) -> Option<Vec<ItemLine>> {
    if let Err(e) = state.reconciler.refresh().await {
        tracing::warn!(error = %e, "console: policy set refresh");
        return None;
    }
    let active = state.reconciler.active().get();
    let lead = chrono::Duration::days(i64::from(state.config.policy.identity_renewal_days));
    let shared: std::collections::BTreeMap<String, String> = state
        .tokens
        .current_values()
        .into_iter()
        .map(|(integration, token)| (integration, token.value))
        .collect();
    let device = crate::policy::state::device_state(
        &state.store,
        &state.reconciler.compiled(),
        active.version,
        udid,
        lead,
        &shared,
    )
    .await
    .ok()
    .flatten()?;
    Some(
        device
            .items
            .into_iter()
            .map(|item| ItemLine {
                kind: format!("{:?}", item.kind),
                status: item.status.to_owned(),
                why: match (&item.group, &item.detail) {
                    (_, Some(detail)) => crate::audit::truncated(&detail.to_string(), 300),
                    (Some(group), None) => format!("group {group}"),
                    (None, None) => String::new(),
                },
                policy: item.policy,
                item: item.item,
            })
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// Actions

#[derive(Debug, Deserialize)]
pub struct ActionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    action: String,
    /// The device's name, typed to confirm a destructive action.
    #[serde(default)]
    confirm: String,
    /// DeviceLock's message on the lock screen.
    #[serde(default)]
    message: String,
}

/// The queries a DeviceInformation from the console asks for.
const INFORMATION_QUERIES: &[&str] = &[
    "DeviceName",
    "OSVersion",
    "BuildVersion",
    "ModelName",
    "Model",
    "ProductName",
    "SerialNumber",
    "DeviceCapacity",
    "AvailableDeviceCapacity",
    "BatteryLevel",
    "WiFiMAC",
    "IsSupervised",
    "IsActivationLockEnabled",
];

pub async fn device_action(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    Path(udid): Path<String>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return problem(
            StatusCode::BAD_REQUEST,
            "Form incomplete",
            "The form was incomplete. Load the device page again.",
            true,
        );
    };
    // What the action is, and what it needs; unknown ones are refused before anything else.
    let (audit_action, target, need) = match form.action.as_str() {
        "information" => (
            "command.enqueue",
            "DeviceInformation",
            Need::Scope(Scope::CommandsWrite),
        ),
        "lock" => ("command.enqueue", "DeviceLock", Need::Lock),
        "wipe" => (
            "command.enqueue",
            "EraseDevice",
            Need::Scope(Scope::CommandsWrite),
        ),
        "retire" => (
            crate::store::AUDIT_RETIRE,
            udid.as_str(),
            Need::Scope(Scope::CertificatesWrite),
        ),
        _ => {
            return problem(
                StatusCode::BAD_REQUEST,
                "Unknown action",
                "That action does not exist.",
                true,
            );
        }
    };
    if let Err(refused) = admin
        .check_csrf(&state, &form.csrf, audit_action, Some(target))
        .await
    {
        return refused;
    }
    if let Err(refused) = admin
        .require(&state, need, audit_action, Some(target))
        .await
    {
        return refused;
    }
    let device = match state.store.device(&udid).await {
        Ok(Some(device)) => device,
        Ok(None) => {
            return problem(
                StatusCode::NOT_FOUND,
                "No such device",
                "There is no enrolled device with that UDID.",
                true,
            );
        }
        Err(e) => return internal(&e),
    };
    let name = device.device_name.clone().unwrap_or_else(|| udid.clone());
    if matches!(form.action.as_str(), "wipe" | "retire") && form.confirm.trim() != name {
        admin
            .audit(
                &state,
                audit_action,
                Some(target),
                OUTCOME_FAILURE,
                Some(json!({"udid": udid, "reason": "device name not confirmed"})),
            )
            .await;
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not confirmed",
            &format!("Nothing was done: type the device's name exactly (\"{name}\") to confirm."),
            true,
        );
    }
    let command = match form.action.as_str() {
        "information" => commands::from_json(&json!({
            "RequestType": "DeviceInformation",
            "Queries": INFORMATION_QUERIES,
        })),
        "lock" => {
            let message = form.message.trim();
            if message.len() > 200 {
                return problem(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Message too long",
                    "The lock-screen message may be at most 200 characters.",
                    true,
                );
            }
            if message.is_empty() {
                commands::from_json(&json!({"RequestType": "DeviceLock"}))
            } else {
                commands::from_json(&json!({"RequestType": "DeviceLock", "Message": message}))
            }
        }
        "wipe" => commands::from_json(&json!({"RequestType": "EraseDevice"})),
        _ => return retire(&state, &admin, &udid, &device.enrollment_id).await,
    };
    let command = match command {
        Ok(command) => command,
        Err(e) => return internal(&e),
    };
    let channel = match state.store.mdm_enrollment(&udid).await {
        Ok(Some(channel)) if channel.status != ChannelStatus::CheckedOut => channel,
        Ok(_) => {
            return problem(
                StatusCode::CONFLICT,
                "Not reachable",
                "This device has no open command channel (checked out or retired): \
                 commands cannot reach it.",
                true,
            );
        }
        Err(e) => return internal(&e),
    };
    enqueue(&state, &admin, &channel, &command, None).await
}

/// Queues `command` for `channel` as `admin`, wakes the device, audits like the API's
/// `POST /commands`, and goes back to the device page.
async fn enqueue(
    state: &AppState,
    admin: &SignedIn,
    channel: &MdmEnrollment,
    command: &Command,
    resent_from: Option<&str>,
) -> Response {
    let uuid = uuid::Uuid::new_v4().to_string().to_uppercase();
    let new = NewCommand {
        body: command.envelope(&uuid),
        uuid: uuid.clone(),
        enrollment_id: channel.id.clone(),
        request_type: command.request_type.clone(),
        fingerprint: command.fingerprint(),
        created_by: admin.actor(),
    };
    let queued = match state.store.enqueue(std::slice::from_ref(&new), true).await {
        Ok(queued) => queued,
        Err(e) => {
            admin
                .audit(
                    state,
                    "command.enqueue",
                    Some(&command.request_type),
                    OUTCOME_FAILURE,
                    None,
                )
                .await;
            return internal(&e);
        }
    };
    let wakeable = channel.push_token.is_some() && channel.push_status != PushStatus::Unregistered;
    let push = if wakeable { "requested" } else { "no-token" };
    let (status, done) = match queued.first() {
        Some(Queued::Duplicate(existing)) => (
            json!({"enrollment_id": channel.id, "command_uuid": existing, "status": "duplicate", "push": push}),
            "duplicate",
        ),
        _ => (
            json!({"enrollment_id": channel.id, "command_uuid": uuid, "status": CommandStatus::Queued, "push": push}),
            "queued",
        ),
    };
    if wakeable {
        state.pusher.wake(vec![channel.id.clone()]);
    }
    let mut detail = json!({"commands": [status], "udid": channel.udid});
    if let (Some(from), Some(object)) = (resent_from, detail.as_object_mut()) {
        object.insert("resent_from".into(), json!(from));
    }
    admin
        .audit(
            state,
            "command.enqueue",
            Some(&command.request_type),
            OUTCOME_SUCCESS,
            Some(detail),
        )
        .await;
    crate::enroll::see_other(&format!("{}?done={done}", device_href(&channel.udid)))
}

async fn retire(state: &AppState, admin: &SignedIn, udid: &str, record: &str) -> Response {
    let by = RetireRequest {
        actor: admin.actor(),
        request_id: admin.request_id.clone(),
        source: admin.source.clone(),
    };
    // The store writes the audit record in the retirement's own transaction.
    match crate::apple::lifecycle::retire(&state.store, record, &by).await {
        Ok(Some(_)) => crate::enroll::see_other(&format!("{}?done=retired", device_href(udid))),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "Not found",
            "That enrollment no longer exists.",
            true,
        ),
        Err(e) => internal(&e),
    }
}

#[derive(Debug, Deserialize)]
pub struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

/// The command and the channel it was queued for, or the page that says it is gone.
async fn command_and_channel(
    state: &AppState,
    uuid: &str,
) -> Result<(CommandRecord, MdmEnrollment), Response> {
    let not_found = || {
        problem(
            StatusCode::NOT_FOUND,
            "No such command",
            "There is no command with that UUID.",
            true,
        )
    };
    let command = match state.store.command(uuid).await {
        Ok(Some(command)) => command,
        Ok(None) => return Err(not_found()),
        Err(e) => return Err(internal(&e)),
    };
    match state.store.mdm_enrollment(&command.enrollment_id).await {
        Ok(Some(channel)) => Ok((command, channel)),
        Ok(None) => Err(not_found()),
        Err(e) => Err(internal(&e)),
    }
}

pub async fn cancel_command(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    Path(uuid): Path<String>,
    form: Result<Form<CsrfOnly>, FormRejection>,
) -> Response {
    let posted = form.map(|f| f.0.csrf).unwrap_or_default();
    if let Err(refused) = admin
        .check_csrf(&state, &posted, "command.cancel", Some(&uuid))
        .await
    {
        return refused;
    }
    if let Err(refused) = admin
        .require(
            &state,
            Need::Scope(Scope::CommandsWrite),
            "command.cancel",
            Some(&uuid),
        )
        .await
    {
        return refused;
    }
    let (_, channel) = match command_and_channel(&state, &uuid).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    match state.store.cancel_command(&uuid).await {
        Ok(true) => {
            admin
                .audit(&state, "command.cancel", Some(&uuid), OUTCOME_SUCCESS, None)
                .await;
            crate::enroll::see_other(&format!("{}?done=cancelled", device_href(&channel.udid)))
        }
        Ok(false) => {
            admin
                .audit(&state, "command.cancel", Some(&uuid), OUTCOME_FAILURE, None)
                .await;
            problem(
                StatusCode::CONFLICT,
                "Not cancelled",
                "That command is no longer pending (answered or already cancelled).",
                true,
            )
        }
        Err(e) => internal(&e),
    }
}

/// Queues a fresh copy (new UUID) of a command the device already answered or that was
/// cancelled.
pub async fn resend_command(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    Path(uuid): Path<String>,
    form: Result<Form<CsrfOnly>, FormRejection>,
) -> Response {
    let posted = form.map(|f| f.0.csrf).unwrap_or_default();
    if let Err(refused) = admin
        .check_csrf(&state, &posted, "command.enqueue", Some(&uuid))
        .await
    {
        return refused;
    }
    let (record, channel) = match command_and_channel(&state, &uuid).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    // Re-sending needs what sending needs: a lock only `devices:lock`, anything else
    // `commands:write`.
    let need = if record.request_type == "DeviceLock" {
        Need::Lock
    } else {
        Need::Scope(Scope::CommandsWrite)
    };
    if let Err(refused) = admin
        .require(&state, need, "command.enqueue", Some(&record.request_type))
        .await
    {
        return refused;
    }
    if record.request_type == "EraseDevice" {
        // A wipe is only ever queued by the form that asks for the device's name.
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Use the wipe form",
            "A wipe is not re-sent with one click: use the device's Wipe form, which asks for \
             its name.",
            true,
        );
    }
    if channel.status == ChannelStatus::CheckedOut {
        return problem(
            StatusCode::CONFLICT,
            "Not reachable",
            "This device's command channel is closed: commands cannot reach it.",
            true,
        );
    }
    let command = match commands::from_plist(&record.body) {
        Ok(command) => command,
        Err(e) => return internal(&e),
    };
    enqueue(&state, &admin, &channel, &command, Some(&uuid)).await
}

/// The device's commands and their statuses, for the device page's live updates.
pub async fn live(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    Path(udid): Path<String>,
) -> Response {
    if !admin.allows(Need::Scope(Scope::DevicesRead)) {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({"error": {"code": "forbidden",
            "message": "devices:read is needed"}})),
        )
            .into_response();
    }
    let channels = match state.store.channels_of(&udid).await {
        Ok(channels) => channels,
        Err(e) => return internal(&e),
    };
    let commands = match device_commands(&state, &channels).await {
        Ok(commands) => commands,
        Err(e) => return internal(&e),
    };
    let lines: Vec<Value> = commands
        .iter()
        .map(command_line)
        .map(|c| {
            json!({"uuid": c.uuid, "status": c.status, "answered_at": c.answered_at,
                   "detail": c.detail, "pending": c.pending})
        })
        .collect();
    Json(json!({"commands": lines})).into_response()
}

// ---------------------------------------------------------------------------------------------
// Audit

#[derive(Debug, Default, Deserialize)]
pub struct AuditParams {
    #[serde(default)]
    actor: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    target: String,
    /// `YYYY-MM-DDTHH:MM` (an `<input type="datetime-local">`, read as UTC), or a date.
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
}

pub struct AuditLine {
    pub at: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub detail: String,
}

#[derive(Template)]
#[template(path = "console/audit.html")]
pub struct AuditPage {
    pub chrome: Chrome,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub since: String,
    pub until: String,
    pub error: Option<String>,
    pub entries: Vec<AuditLine>,
    pub full: bool,
}

/// A time from the audit form, read as UTC: `2026-12-01T05:43`, `2026-12-01T05:43:10` or
/// `2026-12-01`.
pub(super) fn parse_time(text: &str) -> Result<Option<DateTime<Utc>>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    for format in ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(text, format) {
            return Ok(Some(t.and_utc()));
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(Some(t.and_utc()));
    }
    Err(format!(
        "'{}' is not a time: use YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)",
        crate::audit::truncated(text, 40)
    ))
}

const AUDIT_PAGE: u32 = 200;

pub async fn audit(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    query: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(refused) = admin
        .require(&state, Need::Scope(Scope::AuditRead), "console.audit", None)
        .await
    {
        return refused;
    }
    let Query(params) = query.unwrap_or_default();
    let times = parse_time(&params.since).and_then(|s| Ok((s, parse_time(&params.until)?)));
    let (entries, error, status) = match times {
        Ok((since, until)) => {
            let search = AuditSearch {
                actor: bounded(&params.actor),
                action: bounded(&params.action),
                target: bounded(&params.target),
                since,
                until,
                limit: AUDIT_PAGE,
            };
            match state.store.console_audit(&search).await {
                Ok(entries) => (entries, None, StatusCode::OK),
                Err(e) => return internal(&e),
            }
        }
        Err(message) => (Vec::new(), Some(message), StatusCode::BAD_REQUEST),
    };
    let full = entries.len() == AUDIT_PAGE as usize;
    render(
        status,
        &AuditPage {
            chrome: Chrome::of(&admin, "audit"),
            entries: entries
                .into_iter()
                .map(|e| AuditLine {
                    at: e.at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    actor: e.actor,
                    action: e.action,
                    target: e.target.unwrap_or_default(),
                    outcome: e.outcome,
                    detail: crate::audit::truncated(&e.detail.unwrap_or_default(), 400),
                })
                .collect(),
            actor: params.actor,
            action: params.action,
            target: params.target,
            since: params.since,
            until: params.until,
            error,
            full,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_from_product_names() {
        assert_eq!(platform(Some("iPhone15,2")), "iPhone");
        assert_eq!(platform(Some("iPad13,1")), "iPad");
        assert_eq!(platform(Some("MacBookPro18,1")), "Mac");
        assert_eq!(platform(None), "Unknown");
    }

    #[test]
    fn audit_times_are_read_as_utc_or_refused() {
        assert!(parse_time("").unwrap().is_none());
        assert_eq!(
            parse_time("2026-12-01T05:43")
                .unwrap()
                .unwrap()
                .to_rfc3339(),
            "2026-12-01T05:43:00+00:00"
        );
        assert!(parse_time("2026-12-01").unwrap().is_some());
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn only_known_notices_are_shown() {
        assert!(notice_text("queued").is_some());
        assert!(notice_text("<script>").is_none());
    }
}
