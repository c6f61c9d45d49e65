//! Policies: the version in force and its history, the policies it holds, and the plan of a
//! proposed change: one file of the applied set pasted into a form, a set of files uploaded
//! (the whole set, or files laid over the applied one), or the set in a directory on this
//! server under one the operator allows (`[admin] plan_paths`). The plan page shows each
//! changed file's line diff, what each policy would do, and each device's item-by-item
//! difference from the policy engine's own plan (`policy::plan::plan_observed`), devices with
//! the same difference grouped. Git stays the source of truth: the console plans, it never
//! applies.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use askama::Template;
use axum::extract::rejection::FormRejection;
use axum::extract::{Multipart, State};
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
use crate::policy::diff::{Decision, Send};
use crate::policy::load::{MAX_FILE_BYTES, MAX_FILES, is_policy_file};
use crate::policy::plan::Counts;
use crate::store::{DeviceTarget, ItemAction};

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
    /// The directories a plan may read (`[admin] plan_paths`); empty: that form is hidden.
    pub plan_paths: Vec<String>,
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
            plan_paths: state
                .config
                .console
                .plan_paths
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
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

/// A file of the proposed set compared with the applied one.
pub struct FileChange {
    pub path: String,
    /// added, changed or removed.
    pub status: &'static str,
    /// `None`: too long to compare here (or not text).
    pub diff: Option<Vec<DiffLine>>,
}

/// One item of a device's difference: what would happen to it, and why.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemLine {
    pub action: &'static str,
    pub item: String,
    pub policy: String,
    pub group: String,
    /// Locks and wipes (now or scheduled) are marked.
    pub destructive: bool,
}

pub struct DeviceRef {
    pub name: String,
    pub href: String,
    pub owner: String,
}

/// Devices whose difference is the same, item for item.
pub struct DeviceGroup {
    pub devices: usize,
    pub items: Vec<ItemLine>,
    /// Items past the ones shown.
    pub more_items: usize,
    pub examples: Vec<DeviceRef>,
}

#[derive(Template)]
#[template(path = "console/plan.html")]
pub struct PlanPage {
    pub chrome: Chrome,
    /// What was planned, in words (`wifi.yaml changed`, `3 uploaded files`).
    pub title: String,
    pub files: Vec<FileChange>,
    /// Files of the proposed set the same as applied.
    pub files_same: usize,
    pub problems: Vec<String>,
    pub unchanged: bool,
    pub devices: usize,
    pub not_checked_in: usize,
    pub policies: Vec<PlanLine>,
    pub totals: String,
    pub destructive: Vec<String>,
    /// Checked-in devices with a difference, grouped; the largest groups first.
    pub groups: Vec<DeviceGroup>,
    /// Groups past the ones shown, and their devices.
    pub more_groups: usize,
    pub more_group_devices: usize,
    /// Checked-in devices the plan would change nothing on.
    pub devices_unchanged: usize,
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
    if !relative_path_ok(&path) || !is_policy_file(&path) {
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
    let applied = files.clone();
    let removed = form.remove.is_some();
    if removed {
        files.remove(&path);
    } else {
        // Browsers post textarea lines with CRLF.
        files.insert(
            path.clone(),
            form.content.replace("\r\n", "\n").into_bytes(),
        );
    }
    let title = if removed {
        format!("without {path}")
    } else {
        format!("{path} changed")
    };
    plan_page(&state, &admin, title, &applied, files).await
}

/// A `/`-separated path inside a policy directory: relative, no empty, `.`, `..` or hidden
/// part, no backslash or control character, at most 200 bytes.
fn relative_path_ok(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 200
        && !path.starts_with('/')
        && !path.chars().any(|c| c == '\\' || c.is_control())
        && !path
            .split('/')
            .any(|part| part.is_empty() || part.starts_with('.'))
}

/// What an upload may name: a policy file or a profile a policy refers to.
fn upload_name_ok(path: &str) -> bool {
    relative_path_ok(path) && (is_policy_file(path) || path.ends_with(".mobileconfig"))
}

/// Plans the files posted as `multipart/form-data`: `csrf`, `mode` (`replace`: they are the
/// whole proposed set; `overlay`: they replace or add to the applied set's files) and one or
/// more `files`. Bounded: the body by `max_body_bytes` (413), each file by the loader's
/// per-file bound (413), their number by its file count (413), names checked (400).
pub async fn plan_upload(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    let Ok(multipart) = multipart else {
        return problem(
            StatusCode::BAD_REQUEST,
            "Form incomplete",
            "Upload the files with the form on the policies page (multipart/form-data).",
            true,
        );
    };
    let upload = match read_upload(multipart).await {
        Ok(upload) => upload,
        Err((status, message)) => return problem(status, "Upload refused", &message, true),
    };
    if let Err(refused) = admin
        .check_csrf(&state, &upload.csrf, "console.policies.plan", None)
        .await
    {
        return refused;
    }
    if let Err(refused) = require_read(&state, &admin).await {
        return refused;
    }
    if upload.files.is_empty() {
        return problem(
            StatusCode::BAD_REQUEST,
            "No files",
            "Choose one or more policy files (.yaml, .yml) and the profiles they refer to \
             (.mobileconfig).",
            true,
        );
    }
    let applied = match applied_files(&state).await {
        Ok(files) => files,
        Err(page) => return page,
    };
    let count = upload.files.len();
    let (title, files) = if upload.overlay {
        let mut files = applied.clone();
        files.extend(upload.files);
        (
            format!("{count} uploaded file(s) laid over the applied set"),
            files,
        )
    } else {
        (
            format!("{count} uploaded file(s) as the whole set"),
            upload.files,
        )
    };
    plan_page(&state, &admin, title, &applied, files).await
}

struct Upload {
    csrf: String,
    overlay: bool,
    files: BTreeMap<String, Vec<u8>>,
}

/// Reads an upload's fields within its bounds; a refusal is its status and a message.
async fn read_upload(mut multipart: Multipart) -> Result<Upload, (StatusCode, String)> {
    let too_large = |what: String| (StatusCode::PAYLOAD_TOO_LARGE, what);
    let broken = |e: axum::extract::multipart::MultipartError| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "The upload is larger than this server accepts in one request (max_body_bytes). \
             Plan fewer files at a time, or plan from a directory on the server."
                .to_owned()
        } else {
            format!("The upload could not be read: {}", e.body_text())
        };
        (status, message)
    };
    let mut upload = Upload {
        csrf: String::new(),
        overlay: false,
        files: BTreeMap::new(),
    };
    let mut fields = 0usize;
    while let Some(mut field) = multipart.next_field().await.map_err(broken)? {
        fields += 1;
        if fields > MAX_FILES + 8 {
            return Err(too_large(format!(
                "More than {MAX_FILES} files: plan fewer at a time."
            )));
        }
        let name = field.name().unwrap_or_default().to_owned();
        match name.as_str() {
            "csrf" | "mode" => {
                let mut text = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(broken)? {
                    text.extend_from_slice(&chunk);
                    if text.len() > 256 {
                        return Err((
                            StatusCode::BAD_REQUEST,
                            format!("The form's {name} field is too long."),
                        ));
                    }
                }
                let text = String::from_utf8_lossy(&text).into_owned();
                if name == "csrf" {
                    upload.csrf = text;
                } else {
                    upload.overlay = text == "overlay";
                }
            }
            "files" => {
                let file_name = field.file_name().unwrap_or_default().to_owned();
                let mut bytes = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(broken)? {
                    bytes.extend_from_slice(&chunk);
                    if bytes.len() > MAX_FILE_BYTES {
                        return Err(too_large(format!(
                            "{}: larger than {} KiB, the most a policy or profile file may be.",
                            crate::audit::truncated(&file_name, 200),
                            MAX_FILE_BYTES >> 10
                        )));
                    }
                }
                // A file input with nothing chosen posts one empty part without a name.
                if file_name.is_empty() && bytes.is_empty() {
                    continue;
                }
                if !upload_name_ok(&file_name) {
                    return Err((
                        StatusCode::BAD_REQUEST,
                        format!(
                            "\"{}\" is not a name a policy set may hold: policy files end in \
                             .yaml or .yml, profiles in .mobileconfig; a name is relative, \
                             with no \"..\" or hidden parts.",
                            crate::audit::truncated(&file_name, 200)
                        ),
                    ));
                }
                if upload.files.len() >= MAX_FILES {
                    return Err(too_large(format!(
                        "More than {MAX_FILES} files: plan fewer at a time."
                    )));
                }
                if upload.files.insert(file_name.clone(), bytes).is_some() {
                    return Err((
                        StatusCode::BAD_REQUEST,
                        format!("\"{file_name}\" was uploaded twice."),
                    ));
                }
            }
            _ => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    format!(
                        "The form has a field \"{}\" it should not have.",
                        crate::audit::truncated(&name, 64)
                    ),
                ));
            }
        }
    }
    Ok(upload)
}

#[derive(Debug, Deserialize)]
pub struct PathForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    path: String,
}

/// Plans the set in a directory on this server (as `trustbroker policy plan --policies DIR`
/// reads it), when the directory is one the operator allows (`[admin] plan_paths`), or
/// inside one, after `..` and symbolic links are resolved.
pub async fn plan_path(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    form: Result<Form<PathForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return problem(
            StatusCode::BAD_REQUEST,
            "Form incomplete",
            "The plan form was incomplete or too large.",
            true,
        );
    };
    let asked = form.path.trim().to_owned();
    let target = crate::audit::truncated(&asked, 200);
    if let Err(refused) = admin
        .check_csrf(&state, &form.csrf, "console.policies.plan", Some(&target))
        .await
    {
        return refused;
    }
    if let Err(refused) = require_read(&state, &admin).await {
        return refused;
    }
    let roots = state.config.console.plan_paths.clone();
    let read = tokio::task::spawn_blocking(move || read_allowed_dir(&roots, &asked)).await;
    let files = match read {
        Ok(Ok(files)) => files,
        Ok(Err((status, message))) => {
            admin
                .audit(
                    &state,
                    "console.policies.plan",
                    Some(&target),
                    crate::audit::OUTCOME_DENIED,
                    Some(serde_json::json!({"reason": message})),
                )
                .await;
            return problem(status, "Cannot plan this directory", &message, true);
        }
        Err(e) => return internal(&e),
    };
    let applied = match applied_files(&state).await {
        Ok(files) => files,
        Err(page) => return page,
    };
    plan_page(
        &state,
        &admin,
        format!("the set in {target}"),
        &applied,
        files,
    )
    .await
}

/// The policy set in `asked`, if it is one of `roots` or inside one. Refusals: 403 when
/// planning from paths is off or the directory is (or leads, through a symbolic link)
/// outside the roots; 400 when the path is not an absolute directory path that can be read.
fn read_allowed_dir(
    roots: &[PathBuf],
    asked: &str,
) -> Result<BTreeMap<String, Vec<u8>>, (StatusCode, String)> {
    if roots.is_empty() {
        return Err((
            StatusCode::FORBIDDEN,
            "Planning from a directory on the server is off: the operator allows it by \
             listing directories in [admin] plan_paths."
                .into(),
        ));
    }
    let allowed = || {
        roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let outside = || {
        (
            StatusCode::FORBIDDEN,
            format!(
                "{} is not inside a directory the operator allows for planning ({}).",
                crate::audit::truncated(asked, 200),
                allowed()
            ),
        )
    };
    let path = Path::new(asked);
    if asked.is_empty() || asked.len() > 4096 || asked.contains('\0') || !path.is_absolute() {
        return Err((
            StatusCode::BAD_REQUEST,
            format!(
                "Give the directory's absolute path, inside one of: {}.",
                allowed()
            ),
        ));
    }
    // Before the file system is asked anything: `..` is refused outright, and the path as
    // written must already be under a root (nothing outside is probed).
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err((
            StatusCode::FORBIDDEN,
            "The path may not contain \"..\": give the directory's own path.".into(),
        ));
    }
    let canonical_roots: Vec<PathBuf> = roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    let lexically_inside = roots
        .iter()
        .chain(canonical_roots.iter())
        .any(|r| path.starts_with(r));
    if !lexically_inside {
        return Err(outside());
    }
    let real = std::fs::canonicalize(path).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!(
                "{} cannot be read: {e}.",
                crate::audit::truncated(asked, 200)
            ),
        )
    })?;
    let Some(root) = canonical_roots.iter().find(|r| real.starts_with(r)) else {
        // A symbolic link on the way leads elsewhere.
        return Err(outside());
    };
    if !real.is_dir() {
        return Err((
            StatusCode::BAD_REQUEST,
            format!(
                "{} is not a directory.",
                crate::audit::truncated(asked, 200)
            ),
        ));
    }
    let files = crate::policy::load::read_dir_files(&real).map_err(|diagnostics| {
        let text: Vec<String> = diagnostics
            .iter()
            .take(5)
            .map(ToString::to_string)
            .collect();
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("The directory could not be read: {}", text.join("; ")),
        )
    })?;
    // The loader follows symbolic links to files: none may lead out of the allowed root.
    for relative in files.keys() {
        let inside = std::fs::canonicalize(real.join(relative)).is_ok_and(|f| f.starts_with(root));
        if !inside {
            return Err((
                StatusCode::FORBIDDEN,
                format!(
                    "{relative} is a symbolic link that leads outside the allowed directory \
                     {}: nothing was planned.",
                    root.display()
                ),
            ));
        }
    }
    Ok(files)
}

/// The files of `proposed` that differ from `applied`, with line diffs (text files only).
fn file_changes(
    applied: &BTreeMap<String, Vec<u8>>,
    proposed: &BTreeMap<String, Vec<u8>>,
) -> (Vec<FileChange>, usize) {
    let mut changes = Vec::new();
    let mut same = 0;
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    for (path, new) in proposed {
        match applied.get(path) {
            Some(old) if old == new => same += 1,
            old => {
                let status = if old.is_some() { "changed" } else { "added" };
                let old = old.map(|b| text(b)).unwrap_or_default();
                changes.push(FileChange {
                    path: path.clone(),
                    status,
                    diff: diff_of(path, &old, &text(new)),
                });
            }
        }
    }
    for (path, old) in applied {
        if !proposed.contains_key(path) {
            changes.push(FileChange {
                path: path.clone(),
                status: "removed",
                diff: diff_of(path, &text(old), ""),
            });
        }
    }
    changes.sort_by(|a, b| a.path.cmp(&b.path));
    (changes, same)
}

/// Most changed files whose line diff one plan page draws.
const DIFFS_MAX: usize = 20;

fn diff_of(path: &str, old: &str, new: &str) -> Option<Vec<DiffLine>> {
    if path.ends_with(".mobileconfig") && (old.contains('\0') || new.contains('\0')) {
        // A signed (binary) profile.
        return None;
    }
    line_diff(old, new)
}

/// How a decision reads in the per-device difference.
fn item_line(d: &Decision) -> ItemLine {
    let action = match (d.action, &d.send) {
        (ItemAction::Install, Some(Send::RenewIdentity)) => "renew identity certificate",
        (ItemAction::Install, _) => "install",
        (ItemAction::Update, _) => "update",
        (ItemAction::Configure, _) => "send new app configuration",
        (ItemAction::Remove, Some(_)) => "remove",
        (ItemAction::Remove, None) if d.cancel.is_some() => "cancel the queued install",
        (ItemAction::Remove, None) => "stop managing (left on the device)",
        (ItemAction::Run, _) => "run",
        (ItemAction::Enter, _) => "come into scope",
        (ItemAction::Leave, _) => "leave scope",
        (ItemAction::Schedule, _) => "schedule after the grace period",
        (ItemAction::Cancel, _) => "call off the waiting",
        (ItemAction::Lock, _) => "LOCK now",
        (ItemAction::Wipe, _) => "WIPE now",
    };
    let item = match &d.send {
        Some(Send::Run(command)) => format!("{} ({})", command.request_type, d.key),
        _ => d.key.clone(),
    };
    ItemLine {
        action,
        item,
        policy: d.policy.clone(),
        group: d.group_ref.clone().unwrap_or_default(),
        destructive: matches!(
            d.action,
            ItemAction::Lock | ItemAction::Wipe | ItemAction::Schedule
        ) || d.send.as_ref().is_some_and(Send::is_destructive),
    }
}

/// Most distinct differences kept while planning (devices past them are counted only), shown
/// on the page, items shown per difference, and example devices per difference.
const GROUPS_KEPT: usize = 2_000;
const GROUPS_SHOWN: usize = 100;
const ITEMS_SHOWN: usize = 50;
const EXAMPLES_SHOWN: usize = 10;

/// The devices of one difference: how many, and the first few.
#[derive(Default)]
struct Seen {
    devices: usize,
    examples: Vec<DeviceRef>,
}

/// Devices grouped by their difference, bounded whatever the fleet's size.
#[derive(Default)]
struct Grouper {
    groups: HashMap<Vec<ItemLine>, Seen>,
    /// Devices whose difference was not kept (past [`GROUPS_KEPT`]).
    overflow: usize,
    unchanged: usize,
}

impl Grouper {
    fn add(&mut self, device: &DeviceTarget, decisions: &[Decision]) {
        if decisions.is_empty() {
            self.unchanged += 1;
            return;
        }
        // In item key order, as the engine decides them.
        let items: Vec<ItemLine> = decisions.iter().map(item_line).collect();
        let kept = self.groups.len() < GROUPS_KEPT || self.groups.contains_key(&items);
        if !kept {
            self.overflow += 1;
            return;
        }
        let seen = self.groups.entry(items).or_default();
        seen.devices += 1;
        if seen.examples.len() < EXAMPLES_SHOWN {
            seen.examples.push(DeviceRef {
                name: device
                    .device_name
                    .clone()
                    .or_else(|| device.serial_number.clone())
                    .unwrap_or_else(|| device.udid.clone()),
                href: super::pages::device_href(&device.udid),
                owner: device
                    .owner_login
                    .clone()
                    .or_else(|| device.owner_email.clone())
                    .or_else(|| device.owner_display_name.clone())
                    .unwrap_or_default(),
            });
        }
    }

    /// The largest groups first; the rest counted.
    fn shown(self) -> (Vec<DeviceGroup>, usize, usize, usize) {
        let mut groups: Vec<(Vec<ItemLine>, Seen)> = self.groups.into_iter().collect();
        groups.sort_by(|a, b| b.1.devices.cmp(&a.1.devices).then_with(|| a.0.cmp(&b.0)));
        let more: Vec<_> = groups.split_off(groups.len().min(GROUPS_SHOWN));
        let more_groups = more.len() + usize::from(self.overflow > 0);
        let more_devices = more.iter().map(|g| g.1.devices).sum::<usize>() + self.overflow;
        let shown = groups
            .into_iter()
            .map(|(mut items, Seen { devices, examples })| {
                let more_items = items.len().saturating_sub(ITEMS_SHOWN);
                items.truncate(ITEMS_SHOWN);
                DeviceGroup {
                    devices,
                    items,
                    more_items,
                    examples,
                }
            })
            .collect();
        (shown, more_groups, more_devices, self.unchanged)
    }
}

/// Plans `proposed` against the set in force and draws the page: the files' differences, the
/// loader's problems or what each policy and each device would get. Nothing is written.
async fn plan_page(
    state: &AppState,
    admin: &SignedIn,
    title: String,
    applied: &BTreeMap<String, Vec<u8>>,
    proposed: BTreeMap<String, Vec<u8>>,
) -> Response {
    let (mut files, files_same) = file_changes(applied, &proposed);
    for change in files.iter_mut().skip(DIFFS_MAX) {
        change.diff = None;
    }
    let mut page = PlanPage {
        chrome: Chrome::of(admin, "policies"),
        title,
        files,
        files_same,
        problems: Vec::new(),
        unchanged: false,
        devices: 0,
        not_checked_in: 0,
        policies: Vec::new(),
        totals: String::new(),
        destructive: Vec::new(),
        groups: Vec::new(),
        more_groups: 0,
        more_group_devices: 0,
        devices_unchanged: 0,
    };
    let set = match crate::policy::load::load_files(&proposed) {
        Ok(set) => set,
        Err(diagnostics) => {
            page.problems = diagnostics.iter().map(ToString::to_string).collect();
            return render(StatusCode::UNPROCESSABLE_ENTITY, &page);
        }
    };
    let mut grouper = Grouper::default();
    let plan = match crate::policy::plan::plan_observed(
        &state.store,
        &state.reconciler,
        &set,
        |device, decisions| grouper.add(device, decisions),
    )
    .await
    {
        Ok(plan) => plan,
        Err(e) => return internal(&e),
    };
    (
        page.groups,
        page.more_groups,
        page.more_group_devices,
        page.devices_unchanged,
    ) = grouper.shown();
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

    #[test]
    fn upload_names_are_relative_policy_or_profile_files() {
        for good in ["wifi.yaml", "teams/sales.yml", "profiles/vpn.mobileconfig"] {
            assert!(upload_name_ok(good), "{good}");
        }
        for bad in [
            "",
            "/etc/x.yaml",
            "../x.yaml",
            "a/../x.yaml",
            ".hidden.yaml",
            "a/.git/x.yaml",
            "a//x.yaml",
            "a\\x.yaml",
            "notes.txt",
            "x.yaml\n",
        ] {
            assert!(!upload_name_ok(bad), "{bad:?}");
        }
    }

    #[test]
    fn only_allowed_directories_are_read_and_links_may_not_leave_them() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("allowed");
        let outside = base.path().join("outside");
        std::fs::create_dir_all(root.join("proposal")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("proposal/a.yaml"), "name: a\n").unwrap();
        std::fs::write(outside.join("secret.yaml"), "name: s\n").unwrap();
        let roots = vec![root.clone()];
        let dir = root.join("proposal");
        let files = read_allowed_dir(&roots, dir.to_str().unwrap()).unwrap();
        assert_eq!(files.keys().collect::<Vec<_>>(), ["a.yaml"]);
        // Off by default.
        let (status, message) = read_allowed_dir(&[], dir.to_str().unwrap()).unwrap_err();
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(message.contains("plan_paths"), "{message}");
        // Outside, by `..`, relative.
        let (status, _) = read_allowed_dir(&roots, outside.to_str().unwrap()).unwrap_err();
        assert_eq!(status, StatusCode::FORBIDDEN);
        let escape = format!("{}/../outside", root.display());
        let (status, message) = read_allowed_dir(&roots, &escape).unwrap_err();
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(message.contains(".."), "{message}");
        let (status, _) = read_allowed_dir(&roots, "proposal").unwrap_err();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        // A directory link leading out, and a file link leading out.
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let link = root.join("link");
        let (status, message) = read_allowed_dir(&roots, link.to_str().unwrap()).unwrap_err();
        assert_eq!(status, StatusCode::FORBIDDEN, "{message}");
        std::os::unix::fs::symlink(outside.join("secret.yaml"), dir.join("b.yaml")).unwrap();
        let (status, message) = read_allowed_dir(&roots, dir.to_str().unwrap()).unwrap_err();
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(message.contains("b.yaml"), "{message}");
    }

    #[test]
    fn file_changes_list_added_changed_and_removed_files() {
        let applied: BTreeMap<String, Vec<u8>> = [
            ("a.yaml".to_owned(), b"x\n".to_vec()),
            ("b.yaml".to_owned(), b"y\n".to_vec()),
            ("c.yaml".to_owned(), b"z\n".to_vec()),
        ]
        .into();
        let proposed: BTreeMap<String, Vec<u8>> = [
            ("a.yaml".to_owned(), b"x\n".to_vec()),
            ("b.yaml".to_owned(), b"y2\n".to_vec()),
            ("d.yaml".to_owned(), b"new\n".to_vec()),
        ]
        .into();
        let (changes, same) = file_changes(&applied, &proposed);
        assert_eq!(same, 1);
        let seen: Vec<(&str, &str)> = changes
            .iter()
            .map(|c| (c.path.as_str(), c.status))
            .collect();
        assert_eq!(
            seen,
            [
                ("b.yaml", "changed"),
                ("c.yaml", "removed"),
                ("d.yaml", "added")
            ]
        );
    }

    fn device(n: usize) -> DeviceTarget {
        DeviceTarget {
            udid: format!("UDID-{n}"),
            enrollment_id: format!("e-{n}"),
            owner_id: None,
            serial_number: None,
            device_name: Some(format!("Mac {n}")),
            model: None,
            model_name: None,
            product_name: None,
            profiles: None,
            profiles_reported_at: None,
            apps: None,
            apps_reported_at: None,
            owner_login: Some(format!("user{n}")),
            owner_email: None,
            owner_display_name: None,
            owner_subject: None,
            owner_status: None,
            channel_status: None,
            wakeable: false,
            identity_serial: None,
            identity_not_after: None,
        }
    }

    fn decision(key: &str, action: ItemAction, send: Option<Send>) -> Decision {
        Decision {
            key: key.to_owned(),
            kind: crate::store::ItemKind::Profile,
            policy: "engineering".into(),
            group_ref: Some("corp:cn=engineering".into()),
            wanted: true,
            content_hash: String::new(),
            config_hash: None,
            expected_revision: None,
            action,
            send,
            cancel: None,
            due_at: None,
        }
    }

    /// 10,000 devices: the common differences grouped with their counts, the long tail
    /// counted, every device accounted for, the page bounded.
    #[test]
    fn ten_thousand_devices_group_into_a_bounded_page() {
        let mut grouper = Grouper::default();
        let update = decision(
            "profile:passcode",
            ItemAction::Update,
            Some(Send::InstallProfile {
                identifier: "passcode".into(),
                xml: std::sync::Arc::new(Vec::new()),
            }),
        );
        let wipe = decision("leave:engineering:wipe", ItemAction::Wipe, Some(Send::Wipe));
        for n in 0..10_000 {
            let decisions = match n % 10 {
                0..=5 => vec![update.clone()],
                6 | 7 => vec![update.clone(), wipe.clone()],
                8 => Vec::new(),
                // A difference of its own (an app only this device gets), 1,000 of them.
                _ => vec![decision(
                    &format!("app:only.{n}"),
                    ItemAction::Install,
                    None,
                )],
            };
            grouper.add(&device(n), &decisions);
        }
        let (groups, more_groups, more_devices, unchanged) = grouper.shown();
        assert_eq!(groups.len(), GROUPS_SHOWN);
        assert_eq!(groups[0].devices, 6_000);
        assert_eq!(groups[0].items.len(), 1);
        assert_eq!(groups[0].items[0].action, "update");
        assert_eq!(groups[1].devices, 2_000);
        assert!(
            groups[1]
                .items
                .iter()
                .any(|i| i.destructive && i.action == "WIPE now")
        );
        assert!(groups.iter().all(|g| g.examples.len() <= EXAMPLES_SHOWN));
        assert_eq!(groups[0].examples[0].owner, "user0");
        assert_eq!(unchanged, 1_000);
        assert_eq!(more_groups, 1_000 - (GROUPS_SHOWN - 2));
        let shown: usize = groups.iter().map(|g| g.devices).sum();
        assert_eq!(shown + more_devices + unchanged, 10_000);
    }
}
