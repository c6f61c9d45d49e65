//! Policies: the version in force and its history, the policies it holds, and the plan of a
//! proposed change to one file of the applied set (pasted into a form), with a line diff of
//! that file and what the plan would queue. Git stays the source of truth: the console plans,
//! it does not apply.

use std::collections::BTreeMap;

use askama::Template;
use axum::extract::State;
use axum::extract::rejection::FormRejection;
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Form};
use base64::Engine;
use serde::Deserialize;

use super::grants::Need;
use super::pages::{Chrome, when};
use super::{SignedIn, internal, problem, render};
use crate::admin::scope::Scope;
use crate::http::AppState;
use crate::policy::plan::Counts;

pub struct VersionLine {
    pub version: i64,
    pub applied_at: String,
    pub applied_by: String,
    pub git_commit: String,
    pub summary: String,
}

pub struct PolicyLine {
    pub name: String,
    pub file: String,
    pub description: String,
    pub groups: String,
    pub profiles: usize,
    pub apps: usize,
}

#[derive(Template)]
#[template(path = "console/policies.html")]
pub struct PoliciesPage {
    pub chrome: Chrome,
    pub version: i64,
    pub digest: String,
    pub versions: Vec<VersionLine>,
    pub policies: Vec<PolicyLine>,
    pub files: Vec<String>,
}

async fn require_read(state: &AppState, admin: &SignedIn) -> Result<(), Response> {
    admin
        .require(
            state,
            Need::Scope(Scope::PoliciesRead),
            "console.policies",
            None,
        )
        .await
}

pub async fn policies(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
) -> Response {
    if let Err(refused) = require_read(&state, &admin).await {
        return refused;
    }
    if let Err(e) = state.reconciler.refresh().await {
        return internal(&e);
    }
    let active = state.reconciler.active().get();
    let (versions, files) = match (
        state.store.policy_versions(100).await,
        applied_files(&state).await,
    ) {
        (Ok(versions), Ok(files)) => (versions, files),
        (Err(e), _) => return internal(&e),
        (_, Err(page)) => return page,
    };
    render(
        StatusCode::OK,
        &PoliciesPage {
            chrome: Chrome::of(&admin, "policies"),
            version: active.version,
            digest: active.set.digest.clone(),
            versions: versions
                .into_iter()
                .map(|v| VersionLine {
                    version: v.version,
                    applied_at: when(&v.applied_at),
                    applied_by: v.applied_by,
                    git_commit: v.git_commit.unwrap_or_default(),
                    summary: v
                        .summary
                        .map(|s| crate::audit::truncated(&s, 300))
                        .unwrap_or_default(),
                })
                .collect(),
            policies: active
                .set
                .policies
                .iter()
                .map(|p| PolicyLine {
                    name: p.name.clone(),
                    file: p.file.clone(),
                    description: p.description.clone().unwrap_or_default(),
                    groups: p
                        .groups
                        .iter()
                        .map(|g| format!("{}: {}", g.provider, g.id))
                        .collect::<Vec<_>>()
                        .join(", "),
                    profiles: p.profiles.len(),
                    apps: p.apps.len(),
                })
                .collect(),
            files: files.into_keys().collect(),
        },
    )
}

/// The files of the applied version (path → bytes); empty before the first apply.
async fn applied_files(state: &AppState) -> Result<BTreeMap<String, Vec<u8>>, Response> {
    read_applied_files(state).await.map_err(|e| internal(&e))
}

async fn read_applied_files(state: &AppState) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let Some(latest) = state
        .store
        .latest_policy_version()
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(BTreeMap::new());
    };
    let encoded: BTreeMap<String, String> =
        serde_json::from_str(&latest.files).map_err(|e| format!("applied files: {e}"))?;
    let engine = base64::engine::general_purpose::STANDARD;
    encoded
        .into_iter()
        .map(|(path, b64)| match engine.decode(b64) {
            Ok(bytes) => Ok((path, bytes)),
            Err(e) => Err(format!("applied file {path}: {e}")),
        })
        .collect()
}

#[derive(Debug, Deserialize)]
pub struct PlanForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    content: String,
    /// Plan the set without this file.
    #[serde(default)]
    remove: Option<String>,
}

/// One line of a diff: `' '` kept, `'-'` removed, `'+'` added.
pub struct DiffLine {
    pub mark: char,
    pub class: &'static str,
    pub text: String,
}

pub struct PlanLine {
    pub name: String,
    pub file: String,
    pub status: &'static str,
    pub devices: usize,
    pub entering: usize,
    pub leaving: usize,
    pub commands: String,
}

#[derive(Template)]
#[template(path = "console/plan.html")]
pub struct PlanPage {
    pub chrome: Chrome,
    pub path: String,
    pub removed: bool,
    pub diff: Option<Vec<DiffLine>>,
    pub problems: Vec<String>,
    pub unchanged: bool,
    pub devices: usize,
    pub not_checked_in: usize,
    pub policies: Vec<PlanLine>,
    pub totals: String,
    pub destructive: Vec<String>,
}

/// What the plan would queue, in words (`3 install profile, 1 remove app`).
fn counts_text(c: &Counts) -> String {
    let named = [
        (c.install_profile, "install profile"),
        (c.update_profile, "update profile"),
        (c.remove_profile, "remove profile"),
        (c.install_app, "install app"),
        (c.update_app, "update app"),
        (c.configure_app, "configure app"),
        (c.remove_app, "remove app"),
        (c.run_command, "run command"),
        (c.lock, "lock"),
        (c.wipe, "wipe"),
        (c.scheduled_deprovisioning, "scheduled lock or wipe"),
        (c.waiting_for_variables, "waiting for a variable"),
    ];
    let parts: Vec<String> = named
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
    if parts.is_empty() {
        "nothing".to_owned()
    } else {
        parts.join(", ")
    }
}

/// Most lines of a file the diff compares (the LCS table is lines × lines).
const DIFF_MAX_LINES: usize = 2000;

/// A line diff (longest common subsequence); `None` when either side is too long.
pub fn line_diff(old: &str, new: &str) -> Option<Vec<DiffLine>> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    if a.len() > DIFF_MAX_LINES || b.len() > DIFF_MAX_LINES {
        return None;
    }
    // lcs[i][j]: the longest common subsequence of a[i..] and b[j..].
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            let value = if a.get(i) == b.get(j) {
                lcs.get(i + 1)
                    .and_then(|r| r.get(j + 1))
                    .copied()
                    .unwrap_or(0)
                    + 1
            } else {
                let down = lcs.get(i + 1).and_then(|r| r.get(j)).copied().unwrap_or(0);
                let right = lcs.get(i).and_then(|r| r.get(j + 1)).copied().unwrap_or(0);
                down.max(right)
            };
            if let Some(cell) = lcs.get_mut(i).and_then(|r| r.get_mut(j)) {
                *cell = value;
            }
        }
    }
    let at = |i: usize, j: usize| lcs.get(i).and_then(|r| r.get(j)).copied().unwrap_or(0);
    let line = |mark: char, text: &str| DiffLine {
        mark,
        class: match mark {
            '+' => "added",
            '-' => "removed",
            _ => "kept",
        },
        text: text.to_owned(),
    };
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                out.push(line(' ', x));
                i += 1;
                j += 1;
            }
            (Some(x), Some(_)) if at(i + 1, j) >= at(i, j + 1) => {
                out.push(line('-', x));
                i += 1;
            }
            (_, Some(y)) => {
                out.push(line('+', y));
                j += 1;
            }
            (Some(x), None) => {
                out.push(line('-', x));
                i += 1;
            }
            (None, None) => break,
        }
    }
    Some(out)
}

/// The plan of the applied set with one file replaced, added or removed.
pub async fn plan(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    form: Result<Form<PlanForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return problem(
            StatusCode::BAD_REQUEST,
            "Form incomplete",
            "The plan form was incomplete or too large.",
            true,
        );
    };
    if let Err(refused) = admin
        .check_csrf(&state, &form.csrf, "console.policies.plan", None)
        .await
    {
        return refused;
    }
    if let Err(refused) = require_read(&state, &admin).await {
        return refused;
    }
    let path = form.path.trim().to_owned();
    let path_ok = !path.is_empty()
        && path.len() <= 200
        && !path.starts_with('/')
        && !path
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        && (path.ends_with(".yaml") || path.ends_with(".yml"));
    if !path_ok {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not a policy file",
            "Give the file's path in the policy directory, such as wifi.yaml or \
             teams/sales.yaml (a .yaml or .yml file).",
            true,
        );
    }
    let mut files = match applied_files(&state).await {
        Ok(files) => files,
        Err(page) => return page,
    };
    let removed = form.remove.is_some();
    let old = files
        .get(&path)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    // Browsers post textarea lines with CRLF.
    let new = if removed {
        String::new()
    } else {
        form.content.replace("\r\n", "\n")
    };
    if removed {
        files.remove(&path);
    } else {
        files.insert(path.clone(), new.clone().into_bytes());
    }
    let diff = line_diff(&old, &new);
    let mut page = PlanPage {
        chrome: Chrome::of(&admin, "policies"),
        path,
        removed,
        diff,
        problems: Vec::new(),
        unchanged: false,
        devices: 0,
        not_checked_in: 0,
        policies: Vec::new(),
        totals: String::new(),
        destructive: Vec::new(),
    };
    let set = match crate::policy::load::load_files(&files) {
        Ok(set) => set,
        Err(diagnostics) => {
            page.problems = diagnostics.iter().map(ToString::to_string).collect();
            return render(StatusCode::UNPROCESSABLE_ENTITY, &page);
        }
    };
    let plan = match crate::policy::plan::plan(&state.store, &state.reconciler, &set).await {
        Ok(plan) => plan,
        Err(e) => return internal(&e),
    };
    page.unchanged = plan.unchanged;
    page.devices = plan.devices;
    page.not_checked_in = plan.devices_not_checked_in;
    page.totals = counts_text(&plan.totals);
    page.policies = plan
        .policies
        .iter()
        .map(|p| PlanLine {
            name: p.name.clone(),
            file: p.file.clone(),
            status: p.status,
            devices: p.devices_in_scope,
            entering: p.entering,
            leaving: p.leaving,
            commands: counts_text(&p.commands),
        })
        .collect();
    page.destructive = plan
        .destructive
        .iter()
        .map(|d| {
            format!(
                "{}: {} after {} s — {} device(s) now{}",
                d.policy,
                d.action,
                d.after_secs,
                d.devices,
                if d.armed {
                    "; armed for devices that leave later"
                } else {
                    ""
                }
            )
        })
        .collect();
    render(StatusCode::OK, &page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_diffs_keep_common_lines() {
        let diff = line_diff("a\nb\nc\n", "a\nc\nd\n").unwrap();
        let marks: String = diff.iter().map(|l| l.mark).collect();
        let texts: Vec<&str> = diff.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(marks, " - +");
        assert_eq!(texts, ["a", "b", "c", "d"]);
        assert!(line_diff(&"x\n".repeat(DIFF_MAX_LINES + 1), "").is_none());
    }

    #[test]
    fn counts_read_as_words() {
        let counts = Counts {
            install_profile: 2,
            wipe: 1,
            ..Counts::default()
        };
        assert_eq!(counts_text(&counts), "2 install profile, 1 wipe");
        assert_eq!(counts_text(&Counts::default()), "nothing");
    }
}
