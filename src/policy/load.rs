//! Reads policy files (YAML, one policy per file, and the `.mobileconfig` files they name) into
//! a checked [`PolicySet`], or every problem found, each with `file:line:column`.
//!
//! Checking happens while the YAML is read: a custom `DeserializeSeed` for each part of the
//! format (and for Apple payloads, guided by [`apple_schema`]) reports a problem through
//! `serde::de::Error::custom`, and serde_norway attaches the position of the node being read.
//! That stops the read at the first problem, so a file is read again until no new problem
//! turns up: each pass skips the problems already reported (known by key path and message) and
//! stops at the next one. Passes are bounded; files are small.
//!
//! The same trick locates a node after the fact (a conflict between two files): a "probe" pass
//! stops when it reaches the node's key path.
//!
//! [`apple_schema`]: super::apple_schema

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use plist::{Dictionary, Value};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use sha2::{Digest, Sha256};

use super::apple_schema::{self, Key, Kind, Shape};
use super::model::{
    AppItem, Diagnostic, GroupRef, OnLeave, Platform, Policy, PolicySet, ProfileItem,
};
use super::vars;
use crate::apple::commands::{self, Command};

/// Most files a policy set may hold (policy files and the profiles they name).
pub const MAX_FILES: usize = 1_000;
/// Largest single file.
pub const MAX_FILE_BYTES: usize = 1024 * 1024;
/// Largest set, all files together.
pub const MAX_TOTAL_BYTES: usize = 16 * 1024 * 1024;
/// Deepest directory `read_dir_files` descends into.
const MAX_DIR_DEPTH: usize = 16;
/// After this many problems in one file the rest of it is not read: fix these first.
const MAX_PROBLEMS_PER_FILE: usize = 25;
/// Reads of one file (one per problem, one per payload whose PayloadType came late).
const MAX_PASSES: usize = 64;
/// YAML read in all passes of one set together: problems in large files cost a pass each, and
/// this bounds the time a hostile or broken set can take.
const MAX_READ_BYTES: usize = 64 * 1024 * 1024;
/// Longest grace period for lock and wipe.
const MAX_GRACE: Duration = Duration::from_secs(366 * 24 * 3600);
/// The `file` of a diagnostic about the whole set.
pub const SET_FILE: &str = "(policy set)";
/// The prefix of inline profiles' identifiers; the rest of `org.trustbroker.` belongs to the
/// broker's own profiles (enrollment, identity renewal) and cannot be named by a policy.
pub const INLINE_PREFIX: &str = "org.trustbroker.policy.";
const RESERVED_PREFIX: &str = "org.trustbroker.";

const POLICY_KEYS: &[&str] = &[
    "name",
    "description",
    "targets",
    "profiles",
    "apps",
    "commands_on_join",
    "on_leave",
];
const TARGET_KEYS: &[&str] = &["groups", "platforms"];
const GROUP_KEYS: &[&str] = &["provider", "id"];
const PROFILE_KEYS: &[&str] = &["path", "name", "display_name", "description", "payloads"];
const APP_KEYS: &[&str] = &[
    "bundle_id",
    "itunes_store_id",
    "manifest_url",
    "configuration",
];
const ON_LEAVE_KEYS: &[&str] = &["remove", "lock", "wipe"];
const GRACE_KEYS: &[&str] = &["after"];
/// Keys the loader fills in on every inline payload when they are absent.
const FILLED_PAYLOAD_KEYS: &[&str] = &["PayloadIdentifier", "PayloadUUID", "PayloadVersion"];

// =============================================================================================
// Entry points

/// Reads and checks the policy set in `dir`: [`read_dir_files`], then [`load_files`].
pub fn load_dir(dir: &Path) -> Result<PolicySet, Vec<Diagnostic>> {
    let files = read_dir_files(dir)?;
    load_files(&files)
}

/// Whether `path` names a policy file (`.yaml` or `.yml`).
pub fn is_policy_file(path: &str) -> bool {
    path.ends_with(".yaml") || path.ends_with(".yml")
}

/// Whether `path` names a file a policy may refer to.
fn is_profile_file(path: &str) -> bool {
    path.ends_with(".mobileconfig")
}

/// Collects what [`load_files`] needs from `dir`, recursively: every policy file and every
/// `.mobileconfig`, keyed by `/`-separated relative path. Hidden files and directories (`.git`)
/// are skipped, as are symbolic links to directories. Bounded as [`load_files`] is.
pub fn read_dir_files(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>, Vec<Diagnostic>> {
    let mut files = BTreeMap::new();
    let mut diagnostics = Vec::new();
    let mut total = 0usize;
    let mut pending = vec![(dir.to_path_buf(), String::new(), 0usize)];
    'walk: while let Some((path, relative, depth)) = pending.pop() {
        let shown = if relative.is_empty() {
            dir.display().to_string()
        } else {
            relative.clone()
        };
        let entries = match std::fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) => {
                diagnostics.push(at_file(&shown, format!("cannot read the directory: {e}")));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    diagnostics.push(at_file(&shown, format!("cannot read the directory: {e}")));
                    continue 'walk;
                }
            };
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                diagnostics.push(at_file(
                    &shown,
                    format!("{:?}: file names must be UTF-8", entry.file_name()),
                ));
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let child = if relative.is_empty() {
                name.to_owned()
            } else {
                format!("{relative}/{name}")
            };
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                if depth + 1 > MAX_DIR_DEPTH {
                    diagnostics.push(at_file(
                        &child,
                        format!("directories nest deeper than {MAX_DIR_DEPTH} levels"),
                    ));
                } else {
                    pending.push((entry.path(), child, depth + 1));
                }
                continue;
            }
            if !(is_policy_file(name) || is_profile_file(name)) {
                continue;
            }
            // Follows a symbolic link to a file; one to a directory is not walked.
            let metadata = match std::fs::metadata(entry.path()) {
                Ok(m) if m.is_file() => m,
                Ok(_) => continue,
                Err(e) => {
                    diagnostics.push(at_file(&child, format!("cannot read: {e}")));
                    continue;
                }
            };
            if files.len() >= MAX_FILES {
                diagnostics.push(at_file(
                    &shown,
                    format!("more than {MAX_FILES} policy and profile files"),
                ));
                break 'walk;
            }
            if metadata.len() > MAX_FILE_BYTES as u64 {
                diagnostics.push(too_large(&child));
                continue;
            }
            let bytes = match std::fs::read(entry.path()) {
                Ok(bytes) => bytes,
                Err(e) => {
                    diagnostics.push(at_file(&child, format!("cannot read: {e}")));
                    continue;
                }
            };
            if bytes.len() > MAX_FILE_BYTES {
                diagnostics.push(too_large(&child));
                continue;
            }
            total += bytes.len();
            if total > MAX_TOTAL_BYTES {
                diagnostics.push(at_file(
                    &shown,
                    format!(
                        "the files add up to more than {} MiB",
                        MAX_TOTAL_BYTES >> 20
                    ),
                ));
                break 'walk;
            }
            files.insert(child, bytes);
        }
    }
    if diagnostics.is_empty() {
        Ok(files)
    } else {
        Err(sorted(diagnostics))
    }
}

/// Reads and checks a policy set given as relative path → content (`/`-separated paths, as
/// [`read_dir_files`] makes and the admin API receives). Policy files are the `.yaml`/`.yml`
/// entries; other entries are read only when a policy names them. All problems are returned,
/// sorted by file and position.
pub fn load_files(files: &BTreeMap<String, Vec<u8>>) -> Result<PolicySet, Vec<Diagnostic>> {
    load_within(files, MAX_READ_BYTES)
}

/// [`load_files`] with a budget of YAML bytes to read over all passes.
fn load_within(
    files: &BTreeMap<String, Vec<u8>>,
    max_read: usize,
) -> Result<PolicySet, Vec<Diagnostic>> {
    let bounds = check_bounds(files);
    if !bounds.is_empty() {
        return Err(sorted(bounds));
    }
    let loader = Loader {
        files,
        diagnostics: RefCell::new(Vec::new()),
        read: RefCell::new(BTreeSet::new()),
        mobileconfigs: RefCell::new(BTreeMap::new()),
        work: Cell::new(0),
        max_read,
    };
    let mut parsed = Vec::new();
    for (path, bytes) in files.iter().filter(|(path, _)| is_policy_file(path)) {
        loader.read.borrow_mut().insert(path.clone());
        parsed.push(loader.parse(path, bytes));
    }
    let mut policies = Vec::new();
    let mut compiled = Vec::new();
    for file in &parsed {
        if let Some((policy, locs)) = loader.compile(file) {
            compiled.push((file, locs));
            policies.push(policy);
        }
    }
    loader.cross_check(&policies, &compiled);

    let diagnostics = loader.diagnostics.into_inner();
    if !diagnostics.is_empty() {
        return Err(sorted(diagnostics));
    }
    let read = loader.read.into_inner();
    let mut digest = Sha256::new();
    for path in &read {
        if let Some(bytes) = files.get(path) {
            // Length-prefixed, so that no two different sets hash the same stream.
            digest.update((path.len() as u64).to_be_bytes());
            digest.update(path.as_bytes());
            digest.update((bytes.len() as u64).to_be_bytes());
            digest.update(bytes);
        }
    }
    policies.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(PolicySet {
        policies,
        digest: hex::encode(digest.finalize()),
    })
}

fn check_bounds(files: &BTreeMap<String, Vec<u8>>) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    if files.len() > MAX_FILES {
        diagnostics.push(at_file(
            SET_FILE,
            format!("{} files: at most {MAX_FILES} are accepted", files.len()),
        ));
        return diagnostics;
    }
    let mut total = 0usize;
    for (path, bytes) in files {
        if let Err(problem) = check_relative_path(path) {
            let shown: String = path.chars().take(200).collect();
            diagnostics.push(at_file(&shown, problem));
            continue;
        }
        if bytes.len() > MAX_FILE_BYTES {
            diagnostics.push(too_large(path));
        }
        total += bytes.len();
    }
    if total > MAX_TOTAL_BYTES {
        diagnostics.push(at_file(
            SET_FILE,
            format!(
                "the files add up to more than {} MiB",
                MAX_TOTAL_BYTES >> 20
            ),
        ));
    }
    diagnostics
}

/// A path in a policy set: relative, `/`-separated, no `.`/`..`/empty components.
fn check_relative_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > 1024 {
        return Err("a file path must have 1 to 1024 bytes".into());
    }
    if path.starts_with('/') || path.contains('\\') || path.contains(':') {
        return Err("file paths are relative and use `/`".into());
    }
    if path.chars().any(char::is_control) {
        return Err("a file path has a control character".into());
    }
    if path
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err("file paths have no empty, `.` or `..` parts".into());
    }
    Ok(())
}

fn too_large(path: &str) -> Diagnostic {
    at_file(
        path,
        format!("the file is larger than {} KiB", MAX_FILE_BYTES >> 10),
    )
}

fn at_file(file: &str, message: impl Into<String>) -> Diagnostic {
    Diagnostic {
        file: file.to_owned(),
        line: 0,
        column: 0,
        message: message.into(),
    }
}

fn sorted(mut diagnostics: Vec<Diagnostic>) -> Vec<Diagnostic> {
    diagnostics.sort_by(|a, b| {
        (&a.file, a.line, a.column, &a.message).cmp(&(&b.file, b.line, b.column, &b.message))
    });
    diagnostics.dedup();
    diagnostics
}

// =============================================================================================
// The loader: per-file passes, then what needs the whole set

struct Loader<'f> {
    files: &'f BTreeMap<String, Vec<u8>>,
    diagnostics: RefCell<Vec<Diagnostic>>,
    /// Every file that was read (the digest covers these).
    read: RefCell<BTreeSet<String>>,
    /// Each `.mobileconfig` once, whichever policies name it; `None`: it has problems (already
    /// reported).
    mobileconfigs: RefCell<BTreeMap<String, Option<ProfileItem>>>,
    /// YAML bytes read so far, all passes together, and the most allowed
    /// ([`MAX_READ_BYTES`]).
    work: Cell<usize>,
    max_read: usize,
}

/// One policy file after its passes.
struct Parsed<'f> {
    file: &'f str,
    bytes: &'f [u8],
    /// Problems reported in this file (key path + message): later passes step over them.
    known: BTreeSet<String>,
    /// PayloadTypes found after other keys of their payload, by key path.
    types: RefCell<BTreeMap<String, String>>,
    raw: Option<RawPolicy>,
    clean: bool,
}

/// Where each compiled item of a policy came from (key paths), for locating conflicts.
struct Locs {
    profiles: Vec<String>,
    apps: Vec<String>,
}

/// A policy as read, before the parts that need its name or other files.
#[derive(Default)]
struct RawPolicy {
    name: Option<String>,
    description: Option<String>,
    groups: Vec<GroupRef>,
    has_targets: bool,
    platforms: Option<Vec<Platform>>,
    profiles: Vec<RawProfile>,
    apps: Vec<(String, AppItem)>,
    commands: Vec<Command>,
    on_leave: OnLeave,
}

struct RawProfile {
    loc: String,
    source: ProfileSource,
}

enum ProfileSource {
    /// A `.mobileconfig`, by its path in the set.
    File(String),
    Inline {
        name: String,
        display_name: Option<String>,
        description: Option<String>,
        payloads: Vec<Dictionary>,
    },
}

impl<'f> Loader<'f> {
    fn report(&self, diagnostic: Diagnostic) {
        self.diagnostics.borrow_mut().push(diagnostic);
    }

    /// Counts `bytes` more of YAML read; false (said once) when the set's budget is spent.
    fn spend(&self, bytes: usize) -> bool {
        let before = self.work.get();
        let after = before.saturating_add(bytes);
        self.work.set(after);
        if after <= self.max_read {
            return true;
        }
        if before <= self.max_read {
            self.report(at_file(
                SET_FILE,
                "checking stopped: the policy set has too many problems in too much YAML; fix \
                 the problems reported so far",
            ));
        }
        false
    }

    /// Reads one policy file, pass after pass, until a pass finds nothing new.
    fn parse(&self, file: &'f str, bytes: &'f [u8]) -> Parsed<'f> {
        let mut parsed = Parsed {
            file,
            bytes,
            known: BTreeSet::new(),
            types: RefCell::new(BTreeMap::new()),
            raw: None,
            clean: true,
        };
        for _ in 0..MAX_PASSES {
            if !self.spend(bytes.len()) {
                parsed.clean = false;
                return parsed;
            }
            let (result, raised, rerun) = {
                let pass = Pass::new(self, &parsed, None);
                let result = Read(PolicyNode {
                    pass: &pass,
                    loc: String::new(),
                })
                .deserialize(serde_norway::Deserializer::from_slice(bytes));
                (result, pass.raised.take(), pass.rerun.get())
            };
            match (result, raised) {
                (Ok(raw), _) => {
                    parsed.raw = raw;
                    if !rerun {
                        return parsed;
                    }
                }
                (Err(e), Some(Raised::Problem { id, message })) => {
                    parsed.clean = false;
                    parsed.known.insert(id);
                    self.report(positioned(file, &e, message));
                    if parsed.known.len() >= MAX_PROBLEMS_PER_FILE {
                        self.report(at_file(
                            file,
                            format!(
                                "stopped reading after {MAX_PROBLEMS_PER_FILE} problems; fix \
                                 these first"
                            ),
                        ));
                        parsed.raw = None;
                        return parsed;
                    }
                }
                (Err(e), _) => {
                    // Not one of ours: YAML syntax, more than one document, a tag, too deep.
                    parsed.clean = false;
                    let message = e.to_string();
                    self.report(positioned(file, &e, message));
                    parsed.raw = None;
                    return parsed;
                }
            }
        }
        parsed.clean = false;
        self.report(at_file(
            file,
            "the file needs too many passes to check; simplify it",
        ));
        parsed.raw = None;
        parsed
    }

    /// The line and column of the node at `loc` in `parsed` (0, 0 if it cannot be found).
    fn locate(&self, parsed: &Parsed<'_>, loc: &str) -> (usize, usize) {
        if !self.spend(parsed.bytes.len()) {
            return (0, 0);
        }
        let pass = Pass::new(self, parsed, Some(loc));
        let result = Read(PolicyNode {
            pass: &pass,
            loc: String::new(),
        })
        .deserialize(serde_norway::Deserializer::from_slice(parsed.bytes));
        match (result, pass.raised.take()) {
            (Err(e), Some(Raised::Probe)) => e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or_default(),
            _ => (0, 0),
        }
    }

    fn report_at(&self, parsed: &Parsed<'_>, loc: &str, message: String) {
        let (line, column) = self.locate(parsed, loc);
        self.report(Diagnostic {
            file: parsed.file.to_owned(),
            line,
            column,
            message,
        });
    }

    /// Builds the policy of a parsed file: its profiles (inline ones need the policy's name,
    /// file ones are read now) and checks that need the whole policy.
    fn compile(&self, parsed: &Parsed<'f>) -> Option<(Policy, Locs)> {
        let raw = parsed.raw.as_ref()?;
        let name = raw.name.clone()?;
        let mut profiles = Vec::new();
        let mut profile_locs = Vec::new();
        for profile in &raw.profiles {
            let item = match &profile.source {
                ProfileSource::File(path) => self.mobileconfig(path),
                ProfileSource::Inline {
                    name: profile_name,
                    display_name,
                    description,
                    payloads,
                } => {
                    let item = inline_profile(
                        &name,
                        profile_name,
                        display_name.as_deref(),
                        description.as_deref(),
                        payloads.clone(),
                    );
                    self.check_inline(parsed, &profile.loc, &item)
                        .then_some(item)
                }
            };
            if let Some(item) = item {
                profiles.push(item);
                profile_locs.push(profile.loc.clone());
            }
        }
        let (apps, app_locs): (Vec<AppItem>, Vec<String>) = raw
            .apps
            .iter()
            .map(|(loc, app)| (app.clone(), loc.clone()))
            .unzip();
        if !parsed.clean {
            return None;
        }
        Some((
            Policy {
                name,
                description: raw.description.clone(),
                file: parsed.file.to_owned(),
                groups: raw.groups.clone(),
                platforms: raw.platforms.clone(),
                profiles,
                apps,
                commands_on_join: raw.commands.clone(),
                on_leave: raw.on_leave.clone(),
            },
            Locs {
                profiles: profile_locs,
                apps: app_locs,
            },
        ))
    }

    /// What the YAML checks cannot see: payload identifiers unique within the profile, and the
    /// finished profile against Apple's schema once more (a guard against the two drifting).
    fn check_inline(&self, parsed: &Parsed<'_>, loc: &str, item: &ProfileItem) -> bool {
        let mut ok = true;
        let mut identifiers = BTreeSet::new();
        if let Some(Value::Array(payloads)) = item.template.get("PayloadContent") {
            for payload in payloads {
                if let Some(id) = payload
                    .as_dictionary()
                    .and_then(|p| p.get("PayloadIdentifier"))
                    .and_then(Value::as_string)
                    && !identifiers.insert(id)
                {
                    self.report_at(
                        parsed,
                        loc,
                        format!("two payloads of this profile have the PayloadIdentifier `{id}`"),
                    );
                    ok = false;
                }
            }
        }
        if parsed.clean {
            for problem in apple_schema::check_configuration(&item.template) {
                self.report_at(parsed, loc, format!("the built profile: {problem}"));
                ok = false;
            }
        }
        ok
    }

    /// The profile in a `.mobileconfig`, read and checked once.
    fn mobileconfig(&self, path: &str) -> Option<ProfileItem> {
        if let Some(done) = self.mobileconfigs.borrow().get(path) {
            return done.clone();
        }
        self.read.borrow_mut().insert(path.to_owned());
        let bytes = self.files.get(path).map(Vec::as_slice).unwrap_or_default();
        let item = match read_mobileconfig(bytes) {
            Ok(item) => Some(item),
            Err(problems) => {
                let text = std::str::from_utf8(bytes).ok();
                for problem in problems {
                    let (line, column) = text
                        .and_then(|text| line_of_key(text, &problem.path))
                        .unwrap_or_default();
                    self.report(Diagnostic {
                        file: path.to_owned(),
                        line,
                        column,
                        message: problem.to_string(),
                    });
                }
                None
            }
        };
        self.mobileconfigs
            .borrow_mut()
            .insert(path.to_owned(), item.clone());
        item
    }

    /// Checks across the set: unique policy names; one payload identifier, one profile; one
    /// bundle ID, one app definition. Identical definitions in two policies are fine.
    fn cross_check(&self, policies: &[Policy], compiled: &[(&Parsed<'_>, Locs)]) {
        let mut names: BTreeMap<&str, &Parsed<'_>> = BTreeMap::new();
        let mut profiles: BTreeMap<&str, (&Parsed<'_>, &str, &ProfileItem)> = BTreeMap::new();
        let mut apps: BTreeMap<&str, (&Parsed<'_>, &str, &AppItem)> = BTreeMap::new();
        for (policy, (parsed, locs)) in policies.iter().zip(compiled) {
            if let Some(first) = names.get(policy.name.as_str()) {
                self.report_at(
                    parsed,
                    "name",
                    format!(
                        "the policy name `{}` is already used by {}",
                        policy.name, first.file
                    ),
                );
            } else {
                names.insert(&policy.name, parsed);
            }
            for (profile, loc) in policy.profiles.iter().zip(&locs.profiles) {
                match profiles.get(profile.identifier.as_str()) {
                    None => {
                        profiles.insert(&profile.identifier, (parsed, loc, profile));
                    }
                    Some((first, first_loc, first_profile)) => {
                        let same_file = first.file == parsed.file;
                        if same_file || first_profile.template != profile.template {
                            let message = self.conflict(
                                "profile",
                                &profile.identifier,
                                first,
                                first_loc,
                                same_file,
                            );
                            self.report_at(parsed, loc, message);
                        }
                    }
                }
            }
            for (app, loc) in policy.apps.iter().zip(&locs.apps) {
                match apps.get(app.bundle_id.as_str()) {
                    None => {
                        apps.insert(&app.bundle_id, (parsed, loc, app));
                    }
                    Some((first, first_loc, first_app)) => {
                        let same_file = first.file == parsed.file;
                        if same_file || !same_app(first_app, app) {
                            let message =
                                self.conflict("app", &app.bundle_id, first, first_loc, same_file);
                            self.report_at(parsed, loc, message);
                        }
                    }
                }
            }
        }
    }

    fn conflict(
        &self,
        what: &str,
        id: &str,
        first: &Parsed<'_>,
        first_loc: &str,
        same_file: bool,
    ) -> String {
        let (line, column) = self.locate(first, first_loc);
        if same_file {
            format!("{what} `{id}` is listed twice in this policy (first at line {line})")
        } else {
            format!(
                "{what} `{id}` is defined differently in {}:{line}:{column}; one identifier \
                 must mean one thing across the policy set",
                first.file
            )
        }
    }
}

fn same_app(a: &AppItem, b: &AppItem) -> bool {
    a.bundle_id == b.bundle_id
        && a.itunes_store_id == b.itunes_store_id
        && a.manifest_url == b.manifest_url
        && a.configuration == b.configuration
}

/// A diagnostic at the position serde_norway gives the error.
fn positioned(file: &str, error: &serde_norway::Error, message: String) -> Diagnostic {
    let (line, column) = error
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or_default();
    // serde_norway repeats the position in its own messages.
    let message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
    Diagnostic {
        file: file.to_owned(),
        line,
        column,
        message,
    }
}

// =============================================================================================
// Profiles

/// Builds an inline profile's `Configuration` dictionary. Everything the loader adds is
/// derived from the policy and profile names, so the same files give the same bytes.
fn inline_profile(
    policy: &str,
    name: &str,
    display_name: Option<&str>,
    description: Option<&str>,
    payloads: Vec<Dictionary>,
) -> ProfileItem {
    let identifier = format!("{INLINE_PREFIX}{policy}.{name}");
    let content: Vec<Value> = payloads
        .into_iter()
        .enumerate()
        .map(|(index, mut payload)| {
            if !payload.contains_key("PayloadIdentifier") {
                payload.insert(
                    "PayloadIdentifier".into(),
                    Value::String(format!("{identifier}.{index}")),
                );
            }
            if !payload.contains_key("PayloadUUID") {
                payload.insert(
                    "PayloadUUID".into(),
                    Value::String(stable_uuid(&identifier, Some(index))),
                );
            }
            if !payload.contains_key("PayloadVersion") {
                payload.insert("PayloadVersion".into(), Value::Integer(1.into()));
            }
            Value::Dictionary(payload)
        })
        .collect();
    let display_name = display_name.unwrap_or(name).to_owned();
    let mut template = Dictionary::new();
    template.insert("PayloadContent".into(), Value::Array(content));
    if let Some(description) = description {
        template.insert(
            "PayloadDescription".into(),
            Value::String(description.to_owned()),
        );
    }
    template.insert(
        "PayloadDisplayName".into(),
        Value::String(display_name.clone()),
    );
    template.insert(
        "PayloadIdentifier".into(),
        Value::String(identifier.clone()),
    );
    template.insert("PayloadScope".into(), Value::String("System".into()));
    template.insert("PayloadType".into(), Value::String("Configuration".into()));
    template.insert(
        "PayloadUUID".into(),
        Value::String(stable_uuid(&identifier, None)),
    );
    template.insert("PayloadVersion".into(), Value::Integer(1.into()));
    // Every string was checked while it was read; an error here cannot happen.
    let variables = vars::variables_in_dictionary(&template).unwrap_or_default();
    ProfileItem {
        identifier,
        display_name,
        template,
        variables,
    }
}

/// An uppercase UUID (version 8, "custom") from SHA-256 of the identifier and payload index:
/// stable across loads, so a re-sent profile replaces its payloads in place.
pub fn stable_uuid(identifier: &str, index: Option<usize>) -> String {
    let mut hash = Sha256::new();
    hash.update(identifier.as_bytes());
    if let Some(index) = index {
        hash.update(format!("#{index}").as_bytes());
    }
    let digest = hash.finalize();
    let bytes: [u8; 16] = digest
        .get(..16)
        .and_then(|head| head.try_into().ok())
        .unwrap_or_default();
    let uuid = uuid::Builder::from_custom_bytes(bytes).into_uuid();
    uuid.hyphenated()
        .encode_upper(&mut uuid::Uuid::encode_buffer())
        .to_owned()
}

/// Reads a `.mobileconfig`: an unsigned `Configuration` plist, checked against Apple's schema.
fn read_mobileconfig(bytes: &[u8]) -> Result<ProfileItem, Vec<apple_schema::Problem>> {
    let problem = |message: &str| {
        vec![apple_schema::Problem {
            path: String::new(),
            message: message.to_owned(),
        }]
    };
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&0x30) {
        return Err(problem(
            "a signed (CMS) profile: give the unsigned profile; the broker signs what it sends",
        ));
    }
    let value = crate::apple::plist::parse_value(bytes)
        .map_err(|e| problem(&format!("not a readable profile: {e}")))?;
    let Value::Dictionary(template) = value else {
        return Err(problem(
            "a profile is a dictionary (PayloadType Configuration)",
        ));
    };
    if template.get("PayloadType").and_then(Value::as_string) != Some("Configuration") {
        return Err(problem(
            "not a configuration profile: the top-level PayloadType must be Configuration",
        ));
    }
    let mut problems = apple_schema::check_configuration(&template);
    let identifier = template
        .get("PayloadIdentifier")
        .and_then(Value::as_string)
        .unwrap_or_default()
        .to_owned();
    if identifier.starts_with(RESERVED_PREFIX) {
        problems.push(apple_schema::Problem {
            path: "PayloadIdentifier".into(),
            message: format!(
                "identifiers starting with `{RESERVED_PREFIX}` are reserved for the broker's own \
                 profiles"
            ),
        });
    }
    if let Some(Value::Array(payloads)) = template.get("PayloadContent") {
        for (index, payload) in payloads.iter().enumerate() {
            if payload
                .as_dictionary()
                .and_then(|p| p.get("PayloadType"))
                .and_then(Value::as_string)
                == Some("com.apple.mdm")
            {
                problems.push(apple_schema::Problem {
                    path: format!("PayloadContent[{index}].PayloadType"),
                    message: "an MDM payload belongs in the enrollment profile, which the broker \
                              makes"
                        .into(),
                });
            }
        }
    }
    let variables = match vars::variables_in_dictionary(&template) {
        Ok(variables) => variables,
        Err(message) => {
            let (path, message) = match message.split_once(": ") {
                Some((path, rest)) => (path.to_owned(), rest.to_owned()),
                None => (String::new(), message),
            };
            problems.push(apple_schema::Problem { path, message });
            Default::default()
        }
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let display_name = template
        .get("PayloadDisplayName")
        .and_then(Value::as_string)
        .unwrap_or(&identifier)
        .to_owned();
    Ok(ProfileItem {
        identifier,
        display_name,
        template,
        variables,
    })
}

/// Where a key path's last key is written in a plist's XML, found by text: the first
/// `<key>NAME</key>`. Cheap, and right whenever the key name is unique in the file.
fn line_of_key(text: &str, path: &str) -> Option<(usize, usize)> {
    let last = path.rsplit('.').next()?;
    let name = last.split('[').next()?;
    if name.is_empty() {
        return None;
    }
    let needle = format!("<key>{name}</key>");
    let at = text.find(&needle)?;
    let before = text.get(..at)?;
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(at, |nl| at - nl - 1) + 1;
    Some((line, column))
}

// =============================================================================================
// One pass over a file

/// Why a pass stopped early.
enum Raised {
    /// A problem not reported before: its identity (key path + message) and message.
    Problem { id: String, message: String },
    /// The node a probe looked for.
    Probe,
}

struct Pass<'a> {
    loader: &'a Loader<'a>,
    file: &'a str,
    known: &'a BTreeSet<String>,
    types: &'a RefCell<BTreeMap<String, String>>,
    probe: Option<&'a str>,
    raised: RefCell<Option<Raised>>,
    /// A payload's type was learnt late: read the file once more to check its first keys.
    rerun: Cell<bool>,
}

impl<'a> Pass<'a> {
    fn new(loader: &'a Loader<'a>, parsed: &'a Parsed<'a>, probe: Option<&'a str>) -> Self {
        Pass {
            loader,
            file: parsed.file,
            known: &parsed.known,
            types: &parsed.types,
            probe,
            raised: RefCell::new(None),
            rerun: Cell::new(false),
        }
    }

    /// Reports a problem at the node being read: a known one is stepped over (`Ok`), a new one
    /// stops the pass, and serde_norway attaches the node's position to the error.
    fn problem<E: de::Error>(&self, loc: &str, message: impl Into<String>) -> Result<(), E> {
        let message = message.into();
        let id = format!("{loc}\u{0}{message}");
        if self.known.contains(&id) {
            return Ok(());
        }
        let error = E::custom(&message);
        *self.raised.borrow_mut() = Some(Raised::Problem { id, message });
        Err(error)
    }

    /// Stops the pass at the node a probe looks for.
    fn probe<E: de::Error>(&self, loc: &str) -> Result<(), E> {
        if self.probe == Some(loc) {
            *self.raised.borrow_mut() = Some(Raised::Probe);
            return Err(E::custom("probe"));
        }
        Ok(())
    }

    /// The directory of the policy file, for paths relative to it.
    fn dir(&self) -> &str {
        self.file.rsplit_once('/').map_or("", |(dir, _)| dir)
    }
}

fn child(loc: &str, key: &str) -> String {
    if loc.is_empty() {
        key.to_owned()
    } else {
        format!("{loc}.{key}")
    }
}

fn index(loc: &str, i: usize) -> String {
    format!("{loc}[{i}]")
}

// ---------------------------------------------------------------------------------------------
// Nodes: one per part of the format

/// A scalar as YAML gave it.
#[derive(Clone, Copy)]
enum Scalar<'s> {
    Str(&'s str),
    Signed(i64),
    Unsigned(u64),
    Real(f64),
    Bool(bool),
    Null,
}

impl Scalar<'_> {
    fn describe(self) -> String {
        match self {
            Scalar::Str(s) => {
                let shown: String = s.chars().take(40).collect();
                let more = if s.chars().count() > 40 { "…" } else { "" };
                format!("the string \"{shown}{more}\"")
            }
            Scalar::Signed(n) => format!("the integer {n}"),
            Scalar::Unsigned(n) => format!("the integer {n}"),
            Scalar::Real(n) => format!("the number {n}"),
            Scalar::Bool(b) => format!("the boolean {b}"),
            Scalar::Null => "nothing (null)".into(),
        }
    }
}

/// The two accessors every node with `pass` and `loc` fields has.
macro_rules! pass_and_loc {
    () => {
        fn pass(&self) -> &Pass<'_> {
            self.pass
        }

        fn loc(&self) -> &str {
            &self.loc
        }
    };
}

/// How one part of the format reads a node. The defaults report the wrong kind of node (after
/// skipping its contents, so that the pass can go on when the problem is a known one).
trait Node<'de>: Sized {
    type Out;
    fn pass(&self) -> &Pass<'_>;
    fn loc(&self) -> &str;
    /// What was expected, for messages: "a list of groups".
    fn expected(&self) -> String;

    fn scalar<E: de::Error>(self, found: Scalar<'_>) -> Result<Option<Self::Out>, E> {
        self.wrong(&found.describe())
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Self::Out>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        self.wrong("a mapping")
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<Self::Out>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.wrong("a list")
    }

    fn wrong<E: de::Error>(self, found: &str) -> Result<Option<Self::Out>, E> {
        let message = format!("expected {}, found {found}", self.expected());
        self.pass().problem(self.loc(), message)?;
        Ok(None)
    }
}

/// Reads a node with `N`: `Ok(None)` when a known problem was stepped over.
struct Read<N>(N);

impl<'de, N: Node<'de>> DeserializeSeed<'de> for Read<N> {
    type Value = Option<N::Out>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, N: Node<'de>> Read<N> {
    fn scalar<E: de::Error>(self, found: Scalar<'_>) -> Result<Option<N::Out>, E> {
        self.0.pass().probe(self.0.loc())?;
        self.0.scalar(found)
    }
}

impl<'de, N: Node<'de>> Visitor<'de> for Read<N> {
    type Value = Option<N::Out>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.expected())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        self.scalar(Scalar::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        self.scalar(Scalar::Signed(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.scalar(Scalar::Unsigned(v))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Self::Value, E> {
        match i64::try_from(v) {
            Ok(v) => self.scalar(Scalar::Signed(v)),
            Err(_) => self.scalar(Scalar::Real(v as f64)),
        }
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
        match u64::try_from(v) {
            Ok(v) => self.scalar(Scalar::Unsigned(v)),
            Err(_) => self.scalar(Scalar::Real(v as f64)),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        self.scalar(Scalar::Real(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.scalar(Scalar::Str(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.scalar(Scalar::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.scalar(Scalar::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.pass().probe(self.0.loc())?;
        self.0.map(map)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.0.pass().probe(self.0.loc())?;
        self.0.seq(seq)
    }
}

// --- keys ------------------------------------------------------------------------------------

/// Which keys a mapping allows.
#[derive(Clone, Copy)]
enum Keys<'s> {
    Fixed(&'s [&'static str]),
    Apple(Shape),
    Free,
}

struct KeyNode<'p, 's> {
    pass: &'p Pass<'p>,
    /// The mapping's key path; a key's own path is `loc.key`.
    loc: &'s str,
    keys: Keys<'s>,
    /// Names the mapping in messages: "a policy", "com.apple.wifi.managed".
    owner: &'s str,
    seen: &'s dyn Fn(&str) -> bool,
    key_loc: String,
}

impl<'de> Node<'de> for KeyNode<'_, '_> {
    type Out = String;

    fn pass(&self) -> &Pass<'_> {
        self.pass
    }

    fn loc(&self) -> &str {
        &self.key_loc
    }

    fn expected(&self) -> String {
        "a text key".into()
    }

    fn scalar<E: de::Error>(self, found: Scalar<'_>) -> Result<Option<String>, E> {
        let Scalar::Str(key) = found else {
            return self.wrong(&found.describe());
        };
        let loc = child(self.loc, key);
        let unknown = match self.keys {
            Keys::Free => None,
            Keys::Fixed(known) => (!known.contains(&key)).then(|| {
                let mut message = format!("unknown key `{key}` in {}", self.owner);
                if let Some(near) = apple_schema::nearest(key, known.iter().copied()) {
                    message.push_str(&format!("; did you mean `{near}`?"));
                } else {
                    message.push_str(&format!("; expected one of: {}", known.join(", ")));
                }
                message
            }),
            Keys::Apple(shape) => shape
                .key(key)
                .is_none()
                .then(|| shape.unknown_key(key, self.owner)),
        };
        if let Some(message) = unknown {
            self.pass.problem(&loc, message)?;
            return Ok(None);
        }
        if (self.seen)(key) {
            self.pass.problem(&loc, format!("`{key}` is given twice"))?;
            return Ok(None);
        }
        Ok(Some(key.to_owned()))
    }
}

/// The next key of a mapping that is allowed and new; the value of any other is skipped.
/// `None`: the mapping has ended.
fn next_key<'de, A: MapAccess<'de>>(
    map: &mut A,
    pass: &Pass<'_>,
    loc: &str,
    keys: Keys<'_>,
    owner: &str,
    seen: &dyn Fn(&str) -> bool,
) -> Result<Option<String>, A::Error> {
    loop {
        let node = KeyNode {
            pass,
            loc,
            keys,
            owner,
            seen,
            key_loc: child(loc, "(key)"),
        };
        match map.next_key_seed(Read(node))? {
            None => return Ok(None),
            Some(Some(key)) => return Ok(Some(key)),
            Some(None) => {
                map.next_value::<IgnoredAny>()?;
            }
        }
    }
}

// --- leaves ----------------------------------------------------------------------------------

/// A scalar turned into a `T` by `convert`, whose error is the whole message.
struct Leaf<'p, T> {
    pass: &'p Pass<'p>,
    loc: String,
    expected: &'static str,
    convert: fn(Scalar<'_>) -> Result<T, String>,
}

impl<'de, T> Node<'de> for Leaf<'_, T> {
    type Out = T;

    pass_and_loc!();

    fn expected(&self) -> String {
        self.expected.into()
    }

    fn scalar<E: de::Error>(self, found: Scalar<'_>) -> Result<Option<T>, E> {
        match (self.convert)(found) {
            Ok(value) => Ok(Some(value)),
            Err(message) => {
                self.pass.problem(&self.loc, message)?;
                Ok(None)
            }
        }
    }
}

fn leaf<'p, T>(
    pass: &'p Pass<'p>,
    loc: String,
    expected: &'static str,
    convert: fn(Scalar<'_>) -> Result<T, String>,
) -> Read<Leaf<'p, T>> {
    Read(Leaf {
        pass,
        loc,
        expected,
        convert,
    })
}

/// The text of a string scalar; anything else is an error saying what to write.
fn want_text<'s>(found: Scalar<'s>, what: &str) -> Result<&'s str, String> {
    match found {
        Scalar::Str(s) => Ok(s),
        Scalar::Null => Err(format!("expected {what}, found nothing")),
        other => Err(format!(
            "expected {what}, found {} (put it in quotes to make it text)",
            other.describe()
        )),
    }
}

fn name_text(found: Scalar<'_>) -> Result<String, String> {
    let name = want_text(found, "a name")?;
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        return Err(format!(
            "`{name}` is not a valid name: 1 to 64 characters of a-z, 0-9, - and _"
        ));
    }
    Ok(name.to_owned())
}

fn description_text(found: Scalar<'_>) -> Result<String, String> {
    let text = want_text(found, "a description")?;
    if text.chars().count() > 1000 {
        return Err("a description has at most 1000 characters".into());
    }
    Ok(text.to_owned())
}

/// A profile's description is shown on the device: a template like its payloads.
fn profile_description_text(found: Scalar<'_>) -> Result<String, String> {
    let text = description_text(found)?;
    vars::variables_in(&text)?;
    Ok(text)
}

fn display_name_text(found: Scalar<'_>) -> Result<String, String> {
    let text = want_text(found, "a display name")?;
    if text.trim().is_empty() || text.chars().count() > 200 {
        return Err("a display name has 1 to 200 characters".into());
    }
    vars::variables_in(text)?;
    Ok(text.to_owned())
}

fn provider_text(found: Scalar<'_>) -> Result<String, String> {
    let text = want_text(found, "a provider name (the NAME of [idp.NAME])")?;
    let ok = !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(format!(
            "`{text}` is not a provider name: 1 to 64 characters of letters, digits, - and _ \
             (the NAME of [idp.NAME])"
        ));
    }
    Ok(text.to_owned())
}

fn group_id_text(found: Scalar<'_>) -> Result<String, String> {
    let text = want_text(
        found,
        "the group's ID (an LDAP DN, a group value, a SCIM id)",
    )?;
    if text.trim().is_empty() || text.len() > 1024 {
        return Err("a group ID has 1 to 1024 bytes".into());
    }
    if text.trim() != text {
        return Err("a group ID has no leading or trailing spaces".into());
    }
    Ok(text.to_owned())
}

fn platform(found: Scalar<'_>) -> Result<Platform, String> {
    let text = want_text(found, "a platform")?;
    Ok(match text {
        "ios" => Platform::Ios,
        "ipados" => Platform::Ipados,
        "macos" => Platform::Macos,
        "tvos" => Platform::Tvos,
        "visionos" => Platform::Visionos,
        "watchos" => Platform::Watchos,
        other => {
            return Err(format!(
                "unknown platform `{other}`; expected one of: ios, ipados, macos, tvos, \
                 visionos, watchos"
            ));
        }
    })
}

fn boolean(found: Scalar<'_>) -> Result<bool, String> {
    match found {
        Scalar::Bool(b) => Ok(b),
        other => Err(format!(
            "expected true or false, found {}",
            other.describe()
        )),
    }
}

fn payload_type(found: Scalar<'_>) -> Result<String, String> {
    let text = want_text(found, "a PayloadType")?;
    apple_schema::payload(text)?;
    if text == "com.apple.mdm" {
        return Err(
            "an MDM payload belongs in the enrollment profile, which the broker makes".into(),
        );
    }
    Ok(text.to_owned())
}

fn bundle_id(found: Scalar<'_>) -> Result<String, String> {
    let text = want_text(found, "a bundle ID")?;
    let ok = !text.is_empty()
        && text.len() <= 255
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
    if !ok {
        return Err(format!(
            "`{text}` is not a bundle ID: letters, digits, `.`, `-` and `_`, like \
             com.example.app"
        ));
    }
    Ok(text.to_owned())
}

fn itunes_store_id(found: Scalar<'_>) -> Result<u64, String> {
    match found {
        Scalar::Unsigned(n) if n > 0 => Ok(n),
        Scalar::Signed(n) if n > 0 => Ok(n.unsigned_abs()),
        other => Err(format!(
            "expected the app's App Store ID (a positive number), found {}",
            other.describe()
        )),
    }
}

fn manifest_url(found: Scalar<'_>) -> Result<String, String> {
    let text = want_text(found, "the HTTPS URL of the app's manifest")?;
    let url = reqwest::Url::parse(text).map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    if url.scheme() != "https" || url.host_str().is_none_or(str::is_empty) {
        return Err(format!("`{text}`: a manifest URL is https://HOST/…"));
    }
    Ok(text.to_owned())
}

/// `72h`, `30m`, `7d`, `3600s`.
fn duration(found: Scalar<'_>) -> Result<Duration, String> {
    let text = want_text(found, "a duration like 24h, 30m, 7d or 3600s")?;
    let shape = || {
        format!("`{text}` is not a duration: a whole number and a unit, like 24h, 30m, 7d or 3600s")
    };
    let unit_at = text
        .char_indices()
        .last()
        .map(|(at, _)| at)
        .ok_or_else(shape)?;
    let (number, unit) = text.split_at(unit_at);
    let seconds_per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(shape()),
    };
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(shape());
    }
    let count: u64 = number.parse().map_err(|_| shape())?;
    let grace = Duration::from_secs(count.saturating_mul(seconds_per));
    if grace > MAX_GRACE {
        return Err(format!("`{text}`: a grace period is at most 366d"));
    }
    Ok(grace)
}

// --- lists -----------------------------------------------------------------------------------

/// A list whose items are read with the node `item` makes for each item's key path.
struct List<'p, F> {
    pass: &'p Pass<'p>,
    loc: String,
    expected: &'static str,
    item: F,
    /// The message when the list is empty (`None`: empty is fine).
    if_empty: Option<&'static str>,
}

impl<'de, 'p, F, N> Node<'de> for List<'p, F>
where
    F: Fn(String) -> N,
    N: Node<'de>,
{
    type Out = Vec<N::Out>;

    pass_and_loc!();

    fn expected(&self) -> String {
        self.expected.into()
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<Self::Out>, A::Error> {
        let mut items = Vec::new();
        let mut count = 0;
        while let Some(item) = seq.next_element_seed(Read((self.item)(index(&self.loc, count))))? {
            count += 1;
            items.extend(item);
        }
        if count == 0
            && let Some(message) = self.if_empty
        {
            self.pass.problem(&self.loc, message)?;
        }
        Ok(Some(items))
    }
}

fn list<'p, F>(
    pass: &'p Pass<'p>,
    loc: String,
    expected: &'static str,
    if_empty: Option<&'static str>,
    item: F,
) -> Read<List<'p, F>> {
    Read(List {
        pass,
        loc,
        expected,
        item,
        if_empty,
    })
}

// --- the policy --------------------------------------------------------------------------------

struct PolicyNode<'p> {
    pass: &'p Pass<'p>,
    loc: String,
}

impl<'de> Node<'de> for PolicyNode<'_> {
    type Out = RawPolicy;

    pass_and_loc!();

    fn expected(&self) -> String {
        "a policy: a mapping with name:, targets: and what to install".into()
    }

    fn scalar<E: de::Error>(self, found: Scalar<'_>) -> Result<Option<RawPolicy>, E> {
        if let Scalar::Null = found {
            self.pass.problem(
                &self.loc,
                "the file is empty; a policy needs name: and targets:",
            )?;
            return Ok(None);
        }
        self.wrong(&found.describe())
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<RawPolicy>, A::Error> {
        let pass = self.pass;
        let mut policy = RawPolicy::default();
        let seen = RefCell::new(BTreeSet::new());
        let is_seen = |key: &str| seen.borrow().contains(key);
        while let Some(key) = next_key(
            &mut map,
            pass,
            &self.loc,
            Keys::Fixed(POLICY_KEYS),
            "a policy",
            &is_seen,
        )? {
            seen.borrow_mut().insert(key.clone());
            let loc = child(&self.loc, &key);
            match key.as_str() {
                "name" => {
                    policy.name = map.next_value_seed(leaf(pass, loc, "a name", name_text))?
                }
                "description" => {
                    policy.description =
                        map.next_value_seed(leaf(pass, loc, "a description", description_text))?;
                }
                "targets" => {
                    policy.has_targets = true;
                    if let Some((groups, platforms)) =
                        map.next_value_seed(Read(TargetsNode { pass, loc }))?
                    {
                        policy.groups = groups;
                        policy.platforms = platforms;
                    }
                }
                "profiles" => {
                    policy.profiles = map
                        .next_value_seed(list(pass, loc, "a list of profiles", None, |loc| {
                            ProfileNode { pass, loc }
                        }))?
                        .unwrap_or_default();
                }
                "apps" => {
                    policy.apps =
                        map.next_value_seed(list(pass, loc, "a list of apps", None, |loc| {
                            AppNode { pass, loc }
                        }))?
                        .unwrap_or_default();
                }
                "commands_on_join" => {
                    policy.commands = map
                        .next_value_seed(list(pass, loc, "a list of commands", None, |loc| {
                            CommandNode { pass, loc }
                        }))?
                        .unwrap_or_default();
                }
                "on_leave" => {
                    policy.on_leave = map
                        .next_value_seed(Read(OnLeaveNode { pass, loc }))?
                        .unwrap_or_default();
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let missing: Vec<&str> = [("name", policy.name.is_some() || is_seen("name"))]
            .into_iter()
            .chain([("targets", policy.has_targets)])
            .filter(|(_, present)| !present)
            .map(|(key, _)| key)
            .collect();
        if !missing.is_empty() {
            pass.problem(
                &self.loc,
                format!("a policy needs {}", missing.join(" and ")),
            )?;
        }
        Ok(Some(policy))
    }
}

struct TargetsNode<'p> {
    pass: &'p Pass<'p>,
    loc: String,
}

impl<'de> Node<'de> for TargetsNode<'_> {
    type Out = (Vec<GroupRef>, Option<Vec<Platform>>);

    pass_and_loc!();

    fn expected(&self) -> String {
        "targets: a mapping with groups: (and platforms:)".into()
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Self::Out>, A::Error> {
        let pass = self.pass;
        let seen = RefCell::new(BTreeSet::new());
        let is_seen = |key: &str| seen.borrow().contains(key);
        let mut groups = Vec::new();
        let mut platforms = None;
        while let Some(key) = next_key(
            &mut map,
            pass,
            &self.loc,
            Keys::Fixed(TARGET_KEYS),
            "targets",
            &is_seen,
        )? {
            seen.borrow_mut().insert(key.clone());
            let loc = child(&self.loc, &key);
            if key == "groups" {
                let read: Vec<GroupRef> = map
                    .next_value_seed(list(
                        pass,
                        loc.clone(),
                        "a list of groups ({provider, id})",
                        Some("targets.groups needs at least one group"),
                        |loc| GroupNode { pass, loc },
                    ))?
                    .unwrap_or_default();
                let mut unique = BTreeSet::new();
                for group in read {
                    if unique.insert(group.clone()) {
                        groups.push(group);
                    }
                }
            } else {
                let read: Option<Vec<Platform>> = map.next_value_seed(list(
                    pass,
                    loc,
                    "a list of platforms",
                    Some("list at least one platform, or leave platforms out for all"),
                    |loc| Leaf {
                        pass,
                        loc,
                        expected: "a platform",
                        convert: platform,
                    },
                ))?;
                platforms = read.map(|mut list| {
                    list.sort();
                    list.dedup();
                    list
                });
            }
        }
        if !is_seen("groups") {
            pass.problem(
                &self.loc,
                "targets needs groups: (a list of {provider, id}); a policy applies to groups",
            )?;
        }
        Ok(Some((groups, platforms)))
    }
}

struct GroupNode<'p> {
    pass: &'p Pass<'p>,
    loc: String,
}

impl<'de> Node<'de> for GroupNode<'_> {
    type Out = GroupRef;

    pass_and_loc!();

    fn expected(&self) -> String {
        "a group: {provider: NAME, id: \"the group's stable ID\"}".into()
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<GroupRef>, A::Error> {
        let pass = self.pass;
        let seen = RefCell::new(BTreeSet::new());
        let is_seen = |key: &str| seen.borrow().contains(key);
        let mut provider = None;
        let mut id = None;
        while let Some(key) = next_key(
            &mut map,
            pass,
            &self.loc,
            Keys::Fixed(GROUP_KEYS),
            "a group",
            &is_seen,
        )? {
            seen.borrow_mut().insert(key.clone());
            let loc = child(&self.loc, &key);
            if key == "provider" {
                provider =
                    map.next_value_seed(leaf(pass, loc, "a provider name", provider_text))?;
            } else {
                id = map.next_value_seed(leaf(pass, loc, "a group ID", group_id_text))?;
            }
        }
        let missing: Vec<&str> = GROUP_KEYS
            .iter()
            .copied()
            .filter(|key| !is_seen(key))
            .collect();
        if !missing.is_empty() {
            pass.problem(
                &self.loc,
                format!(
                    "a group needs {} (the provider's stable ID, never a display name)",
                    missing.join(" and ")
                ),
            )?;
        }
        Ok(provider
            .zip(id)
            .map(|(provider, id)| GroupRef { provider, id }))
    }
}

// --- profiles --------------------------------------------------------------------------------

struct ProfileNode<'p> {
    pass: &'p Pass<'p>,
    loc: String,
}

impl<'de> Node<'de> for ProfileNode<'_> {
    type Out = RawProfile;

    pass_and_loc!();

    fn expected(&self) -> String {
        "a profile: {path: FILE.mobileconfig} or {name: NAME, payloads: [...]}".into()
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<RawProfile>, A::Error> {
        let pass = self.pass;
        let seen = RefCell::new(BTreeSet::new());
        let is_seen = |key: &str| seen.borrow().contains(key);
        let mut path = None;
        let mut name = None;
        let mut display_name = None;
        let mut description = None;
        let mut payloads = None;
        while let Some(key) = next_key(
            &mut map,
            pass,
            &self.loc,
            Keys::Fixed(PROFILE_KEYS),
            "a profile",
            &is_seen,
        )? {
            seen.borrow_mut().insert(key.clone());
            let loc = child(&self.loc, &key);
            match key.as_str() {
                "path" => path = map.next_value_seed(Read(PathNode { pass, loc }))?,
                "name" => name = map.next_value_seed(leaf(pass, loc, "a name", name_text))?,
                "display_name" => {
                    display_name =
                        map.next_value_seed(leaf(pass, loc, "a display name", display_name_text))?;
                }
                "description" => {
                    description = map.next_value_seed(leaf(
                        pass,
                        loc,
                        "a description",
                        profile_description_text,
                    ))?;
                }
                _ => {
                    payloads = map.next_value_seed(list(
                        pass,
                        loc,
                        "a list of payloads",
                        Some("a profile needs at least one payload"),
                        |loc| PayloadNode { pass, loc },
                    ))?;
                }
            }
        }
        let inline_keys = ["name", "display_name", "description", "payloads"];
        if is_seen("path") {
            if inline_keys.iter().any(|key| is_seen(key)) {
                pass.problem(
                    &self.loc,
                    "a profile is either path: (a .mobileconfig file) or name: with payloads:, \
                     not both",
                )?;
                return Ok(None);
            }
            return Ok(path.map(|path| RawProfile {
                loc: self.loc,
                source: ProfileSource::File(path),
            }));
        }
        if !is_seen("name") || !is_seen("payloads") {
            let message = match (is_seen("name"), is_seen("payloads")) {
                (false, false) => {
                    "a profile needs path: (a .mobileconfig file) or name: with payloads:"
                }
                (true, _) => "an inline profile needs payloads:",
                (false, true) => {
                    "an inline profile needs a name: (it becomes part of its \
                                  identifier)"
                }
            };
            pass.problem(&self.loc, message)?;
            return Ok(None);
        }
        Ok(name.zip(payloads).map(|(name, payloads)| RawProfile {
            loc: self.loc,
            source: ProfileSource::Inline {
                name,
                display_name,
                description,
                payloads,
            },
        }))
    }
}

/// `path:` of a profile: a `.mobileconfig` in the set, relative to the policy file.
struct PathNode<'p> {
    pass: &'p Pass<'p>,
    loc: String,
}

impl<'de> Node<'de> for PathNode<'_> {
    type Out = String;

    pass_and_loc!();

    fn expected(&self) -> String {
        "the path of a .mobileconfig file, relative to this policy file".into()
    }

    fn scalar<E: de::Error>(self, found: Scalar<'_>) -> Result<Option<String>, E> {
        let resolved = want_text(found, &self.expected()).and_then(|text| {
            let resolved = resolve_path(self.pass.dir(), text)?;
            if !is_profile_file(&resolved) {
                return Err(format!("`{text}`: a profile file ends in .mobileconfig"));
            }
            if !self.pass.loader.files.contains_key(&resolved) {
                return Err(format!(
                    "no file `{resolved}` in the policy set (paths are relative to the policy \
                     file)"
                ));
            }
            Ok(resolved)
        });
        match resolved {
            Ok(path) => Ok(Some(path)),
            Err(message) => {
                self.pass.problem(&self.loc, message)?;
                Ok(None)
            }
        }
    }
}

/// `reference` relative to `dir`, normalised; it may not leave the policy set.
fn resolve_path(dir: &str, reference: &str) -> Result<String, String> {
    if reference.starts_with('/') || reference.contains('\\') {
        return Err(format!(
            "`{reference}`: a path is relative to the policy file and uses `/`"
        ));
    }
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for part in reference.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!("`{reference}` leaves the policy directory"));
                }
            }
            part => parts.push(part),
        }
    }
    Ok(parts.join("/"))
}

/// One inline payload: a dictionary checked against the schema of its PayloadType. Until the
/// PayloadType is known its keys are read unchecked; when it comes after other keys the file
/// is read again, now knowing the type from the start.
struct PayloadNode<'p> {
    pass: &'p Pass<'p>,
    loc: String,
}

impl<'de> Node<'de> for PayloadNode<'_> {
    type Out = Dictionary;

    pass_and_loc!();

    fn expected(&self) -> String {
        "a payload: a mapping with a PayloadType and its keys".into()
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Dictionary>, A::Error> {
        let pass = self.pass;
        let learnt = pass.types.borrow().get(&self.loc).cloned();
        let mut type_name = learnt.clone();
        let mut shape = learnt
            .as_deref()
            .and_then(|t| apple_schema::payload(t).ok());
        let mut payload = Dictionary::new();
        let mut late = false;
        let mut seen_type = false;
        loop {
            let owner = type_name.clone().unwrap_or_else(|| "this payload".into());
            let keys = match shape {
                Some(shape) => Keys::Apple(shape),
                None => Keys::Free,
            };
            let is_seen =
                |key: &str| payload.contains_key(key) || (key == "PayloadType" && seen_type);
            let Some(key) = next_key(&mut map, pass, &self.loc, keys, &owner, &is_seen)? else {
                break;
            };
            let loc = child(&self.loc, &key);
            if key == "PayloadType" {
                seen_type = true;
                let read = map.next_value_seed(leaf(pass, loc, "a PayloadType", payload_type))?;
                if let Some(name) = read {
                    if shape.is_none() {
                        shape = apple_schema::payload(&name).ok();
                        late = shape.is_some() && !payload.is_empty();
                        type_name = Some(name.clone());
                    }
                    payload.insert(key, Value::String(name));
                }
                continue;
            }
            let value = map.next_value_seed(Read(ValueNode {
                pass,
                loc,
                key: shape.and_then(|s| s.key(&key)),
                name: key.clone(),
                // Unchecked until the type is known (the next pass checks it).
                silent: shape.is_none(),
            }))?;
            if let Some(value) = value {
                payload.insert(key, value);
            }
        }
        if late && learnt.is_none() {
            if let Some(name) = &type_name {
                pass.types
                    .borrow_mut()
                    .insert(self.loc.clone(), name.clone());
            }
            pass.rerun.set(true);
        }
        if !seen_type {
            pass.problem(
                &self.loc,
                "a payload needs a PayloadType, e.g. com.apple.wifi.managed",
            )?;
            return Ok(None);
        }
        if let (Some(shape), Some(name)) = (shape, &type_name) {
            let missing: Vec<&str> = shape
                .required()
                .into_iter()
                .filter(|key| !FILLED_PAYLOAD_KEYS.contains(key) && !payload.contains_key(key))
                .collect();
            if !missing.is_empty() {
                let keys: Vec<String> = missing.iter().map(|k| format!("`{k}`")).collect();
                pass.problem(
                    &self.loc,
                    format!(
                        "{name} needs the key{} {}",
                        plural(keys.len()),
                        keys.join(", ")
                    ),
                )?;
            }
        }
        Ok(Some(payload))
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Any value inside a payload or an app configuration, converted to a plist value. With a
/// schema key, its type guides the conversion (`<data>` from base64, `<date>` from RFC 3339,
/// `<real>` from an integer) and is checked; without one (app configuration, Apple's `<any>`),
/// YAML's own types are kept. Strings are checked for `${...}` variables.
struct ValueNode<'p> {
    pass: &'p Pass<'p>,
    loc: String,
    key: Option<Key>,
    /// The key's name, for messages.
    name: String,
    /// Read without reporting anything (a payload whose type is not known yet).
    silent: bool,
}

impl ValueNode<'_> {
    fn kind(&self) -> Kind {
        self.key.map_or(Kind::Any, Key::kind)
    }

    fn report<E: de::Error, T>(&self, message: String) -> Result<Option<T>, E> {
        if !self.silent {
            self.pass
                .problem(&self.loc, format!("`{}`: {message}", self.name))?;
        }
        Ok(None)
    }
}

impl<'de> Node<'de> for ValueNode<'_> {
    type Out = Value;

    pass_and_loc!();

    fn expected(&self) -> String {
        self.kind().apple_name().into()
    }

    fn wrong<E: de::Error>(self, found: &str) -> Result<Option<Value>, E> {
        self.report(format!("expected {}, found {found}", self.expected()))
    }

    fn scalar<E: de::Error>(self, found: Scalar<'_>) -> Result<Option<Value>, E> {
        let kind = self.kind();
        let value = match (found, kind) {
            (Scalar::Null, _) => {
                return self.report(
                    "no value: a property list has no null; give a value or leave the key out"
                        .into(),
                );
            }
            (Scalar::Str(text), Kind::Data) => {
                let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
                match base64::engine::general_purpose::STANDARD.decode(compact) {
                    Ok(bytes) => Value::Data(bytes),
                    Err(e) => {
                        return self.report(format!("expected <data> as base64 text: {e}"));
                    }
                }
            }
            (Scalar::Str(text), Kind::Date) => match chrono::DateTime::parse_from_rfc3339(text) {
                Ok(date) => Value::Date(std::time::SystemTime::from(date).into()),
                Err(_) => {
                    return self.report(format!(
                        "expected <date> as RFC 3339 text like 2025-01-31T12:00:00Z, found \
                         \"{text}\""
                    ));
                }
            },
            (Scalar::Str(text), _) => {
                if !self.silent
                    && let Err(message) = vars::variables_in(text)
                {
                    return self.report(message);
                }
                Value::String(text.to_owned())
            }
            (Scalar::Signed(n), Kind::Real) => Value::Real(n as f64),
            (Scalar::Unsigned(n), Kind::Real) => Value::Real(n as f64),
            (Scalar::Signed(n), _) => Value::Integer(n.into()),
            (Scalar::Unsigned(n), _) => Value::Integer(n.into()),
            (Scalar::Real(n), _) => Value::Real(n),
            (Scalar::Bool(b), _) => Value::Boolean(b),
        };
        if let Some(key) = self.key
            && !self.silent
            && let Err(message) = key.check_value(&value)
        {
            let hint = match (found, key.kind()) {
                (
                    Scalar::Signed(_) | Scalar::Unsigned(_) | Scalar::Real(_) | Scalar::Bool(_),
                    Kind::String,
                ) => " (put it in quotes to make it text)",
                _ => "",
            };
            return self.report(format!("{message}{hint}"));
        }
        Ok(Some(value))
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Value>, A::Error> {
        if !matches!(self.kind(), Kind::Dictionary | Kind::Any) {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return self.wrong("a mapping");
        }
        let shape = self.key.and_then(Key::contents);
        let keys = match shape {
            Some(shape) if !self.silent => Keys::Apple(shape),
            _ => Keys::Free,
        };
        let mut dictionary = Dictionary::new();
        loop {
            let is_seen = |key: &str| dictionary.contains_key(key);
            let Some(key) = next_key(&mut map, self.pass, &self.loc, keys, &self.name, &is_seen)?
            else {
                break;
            };
            let value = map.next_value_seed(Read(ValueNode {
                pass: self.pass,
                loc: child(&self.loc, &key),
                key: shape.and_then(|s| s.key(&key)),
                name: key.clone(),
                silent: self.silent,
            }))?;
            if let Some(value) = value {
                dictionary.insert(key, value);
            }
        }
        if let (Some(shape), false) = (shape, self.silent) {
            let missing: Vec<String> = shape
                .required()
                .into_iter()
                .filter(|key| !dictionary.contains_key(key))
                .map(|key| format!("`{key}`"))
                .collect();
            if !missing.is_empty() {
                return self.report(format!(
                    "needs the key{} {}",
                    plural(missing.len()),
                    missing.join(", ")
                ));
            }
        }
        Ok(Some(Value::Dictionary(dictionary)))
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<Value>, A::Error> {
        if !matches!(self.kind(), Kind::Array | Kind::Any) {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return self.wrong("a list");
        }
        let item = self.key.and_then(Key::item);
        let mut items = Vec::new();
        let mut count = 0;
        while let Some(value) = seq.next_element_seed(Read(ValueNode {
            pass: self.pass,
            loc: index(&self.loc, count),
            key: item,
            name: format!("{}[{count}]", self.name),
            silent: self.silent,
        }))? {
            count += 1;
            items.extend(value);
        }
        Ok(Some(Value::Array(items)))
    }
}

// --- apps --------------------------------------------------------------------------------------

struct AppNode<'p> {
    pass: &'p Pass<'p>,
    loc: String,
}

impl<'de> Node<'de> for AppNode<'_> {
    type Out = (String, AppItem);

    pass_and_loc!();

    fn expected(&self) -> String {
        "an app: {bundle_id, itunes_store_id or manifest_url, configuration}".into()
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Self::Out>, A::Error> {
        let pass = self.pass;
        let seen = RefCell::new(BTreeSet::new());
        let is_seen = |key: &str| seen.borrow().contains(key);
        let mut bundle = None;
        let mut store_id = None;
        let mut manifest = None;
        let mut configuration = None;
        while let Some(key) = next_key(
            &mut map,
            pass,
            &self.loc,
            Keys::Fixed(APP_KEYS),
            "an app",
            &is_seen,
        )? {
            seen.borrow_mut().insert(key.clone());
            let loc = child(&self.loc, &key);
            match key.as_str() {
                "bundle_id" => {
                    bundle = map.next_value_seed(leaf(pass, loc, "a bundle ID", bundle_id))?;
                }
                "itunes_store_id" => {
                    store_id =
                        map.next_value_seed(leaf(pass, loc, "an App Store ID", itunes_store_id))?;
                }
                "manifest_url" => {
                    manifest =
                        map.next_value_seed(leaf(pass, loc, "an HTTPS URL", manifest_url))?;
                }
                _ => {
                    configuration = map.next_value_seed(Read(ConfigurationNode { pass, loc }))?;
                }
            }
        }
        if !is_seen("bundle_id") {
            pass.problem(&self.loc, "an app needs a bundle_id")?;
            return Ok(None);
        }
        match (is_seen("itunes_store_id"), is_seen("manifest_url")) {
            (true, true) => {
                pass.problem(
                    &self.loc,
                    "an app has either itunes_store_id (App Store) or manifest_url (in-house), \
                     not both",
                )?;
                return Ok(None);
            }
            (false, false) => {
                pass.problem(
                    &self.loc,
                    "an app needs itunes_store_id (App Store) or manifest_url (in-house)",
                )?;
                return Ok(None);
            }
            _ => {}
        }
        let Some(bundle_id) = bundle else {
            return Ok(None);
        };
        if store_id.is_none() && manifest.is_none() {
            return Ok(None);
        }
        let variables = configuration
            .as_ref()
            .and_then(|c| vars::variables_in_dictionary(c).ok())
            .unwrap_or_default();
        Ok(Some((
            self.loc,
            AppItem {
                bundle_id,
                itunes_store_id: store_id,
                manifest_url: manifest,
                configuration,
                variables,
            },
        )))
    }
}

/// An app's managed configuration: a free-form dictionary (the app defines its keys).
struct ConfigurationNode<'p> {
    pass: &'p Pass<'p>,
    loc: String,
}

impl<'de> Node<'de> for ConfigurationNode<'_> {
    type Out = Dictionary;

    pass_and_loc!();

    fn expected(&self) -> String {
        "the app's configuration: a mapping of its keys to values".into()
    }

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<Option<Dictionary>, A::Error> {
        let node = ValueNode {
            pass: self.pass,
            loc: self.loc,
            key: None,
            name: "configuration".into(),
            silent: false,
        };
        Ok(node.map(map)?.and_then(|value| match value {
            Value::Dictionary(d) => Some(d),
            _ => None,
        }))
    }
}

// --- commands ----------------------------------------------------------------------------------

/// Request types a policy may not send on join: installs and removals are the policy's items
/// (tracked, and undone on leave), and destructive actions belong to `on_leave`.
const NOT_ON_JOIN: &[(&str, &str)] = &[
    ("InstallProfile", "list the profile under profiles:"),
    (
        "RemoveProfile",
        "profiles are removed when a device leaves the policy",
    ),
    ("InstallApplication", "list the app under apps:"),
    (
        "EraseDevice",
        "destructive actions belong in on_leave (wipe)",
    ),
    (
        "DeviceLock",
        "destructive actions belong in on_leave (lock)",
    ),
];

struct CommandNode<'p> {
    pass: &'p Pass<'p>,
    loc: String,
}

impl<'de> Node<'de> for CommandNode<'_> {
    type Out = Command;

    pass_and_loc!();

    fn expected(&self) -> String {
        "a command: {RequestType: …, and its keys}".into()
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Command>, A::Error> {
        let mut object = serde_json::Map::new();
        loop {
            let is_seen = |key: &str| object.contains_key(key);
            let Some(key) = next_key(
                &mut map,
                self.pass,
                &self.loc,
                Keys::Free,
                "a command",
                &is_seen,
            )?
            else {
                break;
            };
            let value = map.next_value_seed(Read(JsonNode {
                pass: self.pass,
                loc: child(&self.loc, &key),
            }))?;
            if let Some(value) = value {
                object.insert(key, value);
            }
        }
        let request_type = object
            .get("RequestType")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default();
        if let Some((_, why)) = NOT_ON_JOIN.iter().find(|(t, _)| *t == request_type) {
            self.pass.problem(
                &self.loc,
                format!("{request_type} cannot be a command on join: {why}"),
            )?;
            return Ok(None);
        }
        match commands::from_json(&serde_json::Value::Object(object)) {
            Ok(command) => Ok(Some(command)),
            Err(e) => {
                self.pass.problem(&self.loc, e.to_string())?;
                Ok(None)
            }
        }
    }
}

/// YAML as JSON, for the typed command builder.
struct JsonNode<'p> {
    pass: &'p Pass<'p>,
    loc: String,
}

impl<'de> Node<'de> for JsonNode<'_> {
    type Out = serde_json::Value;

    pass_and_loc!();

    fn expected(&self) -> String {
        "a value".into()
    }

    fn scalar<E: de::Error>(self, found: Scalar<'_>) -> Result<Option<serde_json::Value>, E> {
        Ok(Some(match found {
            Scalar::Str(s) => serde_json::Value::from(s),
            Scalar::Signed(n) => serde_json::Value::from(n),
            Scalar::Unsigned(n) => serde_json::Value::from(n),
            Scalar::Real(n) => serde_json::Value::from(n),
            Scalar::Bool(b) => serde_json::Value::from(b),
            Scalar::Null => serde_json::Value::Null,
        }))
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<serde_json::Value>, A::Error> {
        let mut object = serde_json::Map::new();
        loop {
            let is_seen = |key: &str| object.contains_key(key);
            let Some(key) = next_key(
                &mut map,
                self.pass,
                &self.loc,
                Keys::Free,
                "a command",
                &is_seen,
            )?
            else {
                break;
            };
            let value = map.next_value_seed(Read(JsonNode {
                pass: self.pass,
                loc: child(&self.loc, &key),
            }))?;
            if let Some(value) = value {
                object.insert(key, value);
            }
        }
        Ok(Some(serde_json::Value::Object(object)))
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<serde_json::Value>, A::Error> {
        let mut items = Vec::new();
        let mut count = 0;
        while let Some(value) = seq.next_element_seed(Read(JsonNode {
            pass: self.pass,
            loc: index(&self.loc, count),
        }))? {
            count += 1;
            items.extend(value);
        }
        Ok(Some(serde_json::Value::Array(items)))
    }
}

// --- on_leave ----------------------------------------------------------------------------------

struct OnLeaveNode<'p> {
    pass: &'p Pass<'p>,
    loc: String,
}

impl<'de> Node<'de> for OnLeaveNode<'_> {
    type Out = OnLeave;

    pass_and_loc!();

    fn expected(&self) -> String {
        "on_leave: a mapping with remove:, lock: or wipe:".into()
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<OnLeave>, A::Error> {
        let pass = self.pass;
        let seen = RefCell::new(BTreeSet::new());
        let is_seen = |key: &str| seen.borrow().contains(key);
        let mut on_leave = OnLeave::default();
        while let Some(key) = next_key(
            &mut map,
            pass,
            &self.loc,
            Keys::Fixed(ON_LEAVE_KEYS),
            "on_leave",
            &is_seen,
        )? {
            seen.borrow_mut().insert(key.clone());
            let loc = child(&self.loc, &key);
            match key.as_str() {
                "remove" => {
                    if let Some(remove) =
                        map.next_value_seed(leaf(pass, loc, "true or false", boolean))?
                    {
                        on_leave.remove = remove;
                    }
                }
                "lock" => {
                    on_leave.lock = map
                        .next_value_seed(Read(GraceNode {
                            pass,
                            loc,
                            wipe: false,
                        }))?
                        .flatten();
                }
                _ => {
                    on_leave.wipe = map
                        .next_value_seed(Read(GraceNode {
                            pass,
                            loc,
                            wipe: true,
                        }))?
                        .flatten();
                }
            }
        }
        Ok(Some(on_leave))
    }
}

/// `lock: true | false | {after: 24h}` and `wipe: {after: 72h}`. A wipe always names its grace
/// period, so that none is immediate by accident.
struct GraceNode<'p> {
    pass: &'p Pass<'p>,
    loc: String,
    wipe: bool,
}

const WIPE_NEEDS_AFTER: &str =
    "wipe needs after: (e.g. wipe: {after: 72h}); a wipe always names its grace period";

impl<'de> Node<'de> for GraceNode<'_> {
    type Out = Option<Duration>;

    pass_and_loc!();

    fn expected(&self) -> String {
        if self.wipe {
            "{after: DURATION}, e.g. {after: 72h}".into()
        } else {
            "true, false or {after: DURATION}".into()
        }
    }

    fn scalar<E: de::Error>(self, found: Scalar<'_>) -> Result<Option<Option<Duration>>, E> {
        match (found, self.wipe) {
            (Scalar::Bool(_), true) => {
                self.pass.problem(&self.loc, WIPE_NEEDS_AFTER)?;
                Ok(None)
            }
            (Scalar::Bool(true), false) => Ok(Some(Some(Duration::ZERO))),
            (Scalar::Bool(false), false) => Ok(Some(None)),
            _ => self.wrong(&found.describe()),
        }
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Option<Duration>>, A::Error> {
        let pass = self.pass;
        let seen = Cell::new(false);
        let is_seen = |_: &str| seen.get();
        let owner = if self.wipe { "wipe" } else { "lock" };
        let mut after = None;
        while let Some(key) = next_key(
            &mut map,
            pass,
            &self.loc,
            Keys::Fixed(GRACE_KEYS),
            owner,
            &is_seen,
        )? {
            seen.set(true);
            after =
                map.next_value_seed(leaf(pass, child(&self.loc, &key), "a duration", duration))?;
        }
        if !seen.get() {
            let message = if self.wipe {
                WIPE_NEEDS_AFTER
            } else {
                "lock needs after: (e.g. lock: {after: 24h}), or write lock: true"
            };
            pass.problem(&self.loc, message)?;
            return Ok(None);
        }
        Ok(after.map(Some))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::Variable;

    fn root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    fn shown(diagnostics: &[Diagnostic]) -> Vec<String> {
        diagnostics.iter().map(ToString::to_string).collect()
    }

    fn set(files: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        files
            .iter()
            .map(|(path, text)| ((*path).to_owned(), text.as_bytes().to_vec()))
            .collect()
    }

    fn errors(files: &[(&str, &str)]) -> Vec<String> {
        shown(&load_files(&set(files)).unwrap_err())
    }

    const GROUPS: &str = "targets:\n  groups:\n    - { provider: ldap, id: \"cn=staff,ou=groups,dc=example,dc=org\" }\n";

    fn policy(name: &str, rest: &str) -> String {
        format!("name: {name}\n{GROUPS}{rest}")
    }

    fn wifi(identifier: &str, ssid: &str) -> String {
        let mut payload = Dictionary::new();
        for (k, v) in [
            ("PayloadType", "com.apple.wifi.managed"),
            ("PayloadIdentifier", "org.example.wifi.payload"),
            ("PayloadUUID", "9C7E8A52-4E0B-4B8A-9C1E-5F2A41D3B7A1"),
            ("SSID_STR", ssid),
        ] {
            payload.insert(k.into(), Value::String(v.into()));
        }
        payload.insert("PayloadVersion".into(), Value::Integer(1.into()));
        let mut profile = Dictionary::new();
        profile.insert(
            "PayloadContent".into(),
            Value::Array(vec![Value::Dictionary(payload)]),
        );
        for (k, v) in [
            ("PayloadType", "Configuration"),
            ("PayloadIdentifier", identifier),
            ("PayloadUUID", "3B1F7C2E-8D4A-4F6B-A2E9-0C5D7E8F9A10"),
        ] {
            profile.insert(k.into(), Value::String(v.into()));
        }
        profile.insert("PayloadVersion".into(), Value::Integer(1.into()));
        String::from_utf8(crate::apple::plist::to_xml(&Value::Dictionary(profile))).unwrap()
    }

    #[test]
    fn the_examples_load_cleanly() {
        let set = match load_dir(&root().join("policies")) {
            Ok(set) => set,
            Err(diagnostics) => panic!("{:#?}", shown(&diagnostics)),
        };
        let names: Vec<&str> = set.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["contractors", "engineering-baseline", "staff-essentials"]
        );
        assert_eq!(set.digest.len(), 64);

        let engineering = &set.policies[1];
        assert_eq!(engineering.file, "engineering-baseline.yaml");
        assert_eq!(
            engineering.groups[0],
            GroupRef {
                provider: "ldap".into(),
                id: "cn=developers,ou=groups,dc=example,dc=org".into()
            }
        );
        assert_eq!(
            engineering.platforms,
            Some(vec![Platform::Ios, Platform::Ipados, Platform::Macos])
        );
        let identifiers: Vec<&str> = engineering
            .profiles
            .iter()
            .map(|p| p.identifier.as_str())
            .collect();
        assert_eq!(
            identifiers,
            [
                "org.example.wifi.office",
                "org.trustbroker.policy.engineering-baseline.passcode"
            ]
        );
        assert_eq!(engineering.profiles[1].display_name, "Engineering passcode");
        let app = &engineering.apps[0];
        assert_eq!(app.bundle_id, "com.pingidentity.pingid");
        assert_eq!(app.itunes_store_id, Some(1076521545));
        assert_eq!(
            app.variables,
            BTreeSet::from([Variable::UserEmail, Variable::DeviceSerialNumber])
        );
        assert_eq!(
            engineering.commands_on_join[0].request_type,
            "DeviceInformation"
        );
        assert_eq!(engineering.on_leave, OnLeave::default());

        let contractors = &set.policies[0];
        assert_eq!(
            contractors.on_leave.lock,
            Some(Duration::from_secs(24 * 3600))
        );
        assert!(contractors.on_leave.is_destructive());
        // The same .mobileconfig in two policies is one profile, not a conflict.
        assert_eq!(
            contractors.profiles[0].template,
            engineering.profiles[0].template
        );

        let staff = &set.policies[2];
        assert_eq!(
            staff.profiles[0].variables,
            BTreeSet::from([Variable::UserLogin])
        );
        // Every built profile passes Apple's schema as a whole.
        for policy in &set.policies {
            for profile in &policy.profiles {
                assert_eq!(
                    apple_schema::check_configuration(&profile.template),
                    vec![],
                    "{}",
                    profile.identifier
                );
            }
        }
    }

    #[test]
    fn the_example_mistakes_are_reported_where_they_are() {
        let diagnostics = load_dir(&root().join("tests/fixtures/policies-invalid")).unwrap_err();
        let positions: Vec<(&str, usize, usize)> = diagnostics
            .iter()
            .map(|d| (d.file.as_str(), d.line, d.column))
            .collect();
        assert_eq!(
            positions,
            [
                ("missing-bundle-id.yaml", 7, 5),
                ("missing-required-key.yaml", 9, 9),
                ("misspelled-key.yaml", 10, 9),
                ("unknown-variable.yaml", 10, 19),
                ("wipe-without-after.yaml", 6, 33),
                ("wrong-type.yaml", 9, 84),
            ],
            "{:#?}",
            shown(&diagnostics)
        );
        let messages: Vec<&str> = diagnostics.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(messages[0], "an app needs a bundle_id");
        assert_eq!(
            messages[1],
            "com.apple.webClip.managed needs the key `Label`"
        );
        assert_eq!(
            messages[2],
            "unknown key `minLenght` in com.apple.mobiledevice.passwordpolicy; did you mean \
             `minLength`?"
        );
        assert!(
            messages[3].starts_with(
                "`user_email`: unknown variable `${user.mail}`; known variables: ${user.id}"
            ),
            "{}",
            messages[3]
        );
        assert_eq!(messages[4], WIPE_NEEDS_AFTER);
        assert_eq!(
            messages[5],
            "`requireAlphanumeric`: expected <boolean>, found the string \"yes\""
        );
    }

    #[test]
    fn every_problem_in_a_file_is_reported_in_order() {
        let text = policy(
            "many",
            "profiles:\n\
             \x20 - name: passcode\n\
             \x20   payloads:\n\
             \x20     - PayloadType: com.apple.mobiledevice.passwordpolicy\n\
             \x20       minLenght: 8\n\
             \x20       maxFailedAttempts: 99\n\
             \x20       allowSimple: no\n\
             apps:\n\
             \x20 - { bundle_id: com.example.app, itunes_store_id: 0 }\n\
             on_leave: { lock: { after: soon } }\n\
             colour: blue\n",
        );
        assert_eq!(
            errors(&[("many.yaml", &text)]),
            [
                "many.yaml:9:9: unknown key `minLenght` in com.apple.mobiledevice.passwordpolicy; \
                 did you mean `minLength`?",
                "many.yaml:10:28: `maxFailedAttempts`: the integer 99 is above the maximum 11",
                "many.yaml:11:22: `allowSimple`: expected <boolean>, found the string \"no\"",
                "many.yaml:13:52: expected the app's App Store ID (a positive number), found the \
                 integer 0",
                "many.yaml:14:28: `soon` is not a duration: a whole number and a unit, like 24h, \
                 30m, 7d or 3600s",
                "many.yaml:15:1: unknown key `colour` in a policy; expected one of: name, \
                 description, targets, profiles, apps, commands_on_join, on_leave",
            ]
        );
    }

    #[test]
    fn a_late_payload_type_still_checks_the_keys_before_it() {
        let text = policy(
            "late",
            "profiles:\n  - name: p\n    payloads:\n      - { minLenght: 8, PayloadType: com.apple.mobiledevice.passwordpolicy }\n",
        );
        assert_eq!(
            errors(&[("late.yaml", &text)]),
            [
                "late.yaml:8:11: unknown key `minLenght` in com.apple.mobiledevice.passwordpolicy; \
              did you mean `minLength`?"
            ]
        );
        let good = policy(
            "late",
            "profiles:\n  - name: p\n    payloads:\n      - { minLength: 8, PayloadType: com.apple.mobiledevice.passwordpolicy }\n",
        );
        let set = load_files(&set(&[("late.yaml", &good)])).unwrap();
        let content = set.policies[0].profiles[0].template["PayloadContent"]
            .as_array()
            .unwrap();
        let payload = content[0].as_dictionary().unwrap();
        assert_eq!(payload["minLength"].as_signed_integer(), Some(8));
    }

    #[test]
    fn unknown_payload_types_and_missing_ones() {
        let text = policy(
            "types",
            "profiles:\n  - name: p\n    payloads:\n      - { PayloadType: com.apple.wifi.manage, SSID_STR: x }\n      - { SSID_STR: x }\n      - { PayloadType: com.apple.mdm }\n",
        );
        assert_eq!(
            errors(&[("types.yaml", &text)]),
            [
                "types.yaml:8:24: unknown PayloadType `com.apple.wifi.manage`; did you mean \
                 `com.apple.wifi.managed`?",
                "types.yaml:9:9: a payload needs a PayloadType, e.g. com.apple.wifi.managed",
                "types.yaml:10:24: an MDM payload belongs in the enrollment profile, which the \
                 broker makes",
            ]
        );
    }

    #[test]
    fn inline_profiles_are_complete_and_deterministic() {
        let text = policy(
            "baseline",
            "profiles:\n\
             \x20 - name: clip\n\
             \x20   description: For ${user.login}\n\
             \x20   payloads:\n\
             \x20     - PayloadType: com.apple.webClip.managed\n\
             \x20       Label: Intranet\n\
             \x20       URL: \"https://intranet.example.org/${user.email}\"\n\
             \x20       Icon: aGVsbG8=\n\
             \x20     - { PayloadType: com.apple.mobiledevice.passwordpolicy, PayloadIdentifier: my.own }\n",
        );
        let files = set(&[("baseline.yaml", &text)]);
        let first = load_files(&files).unwrap();
        let second = load_files(&files).unwrap();
        let profile = &first.policies[0].profiles[0];
        assert_eq!(profile.identifier, "org.trustbroker.policy.baseline.clip");
        assert_eq!(profile.display_name, "clip");
        assert_eq!(
            profile.variables,
            BTreeSet::from([Variable::UserLogin, Variable::UserEmail])
        );
        let xml = |set: &PolicySet| {
            crate::apple::plist::to_xml(&Value::Dictionary(
                set.policies[0].profiles[0].template.clone(),
            ))
        };
        assert_eq!(xml(&first), xml(&second));
        assert_eq!(first.digest, second.digest);

        let t = &profile.template;
        assert_eq!(t["PayloadType"].as_string(), Some("Configuration"));
        assert_eq!(t["PayloadScope"].as_string(), Some("System"));
        assert_eq!(
            t["PayloadDescription"].as_string(),
            Some("For ${user.login}")
        );
        let uuid = t["PayloadUUID"].as_string().unwrap();
        assert_eq!(
            uuid,
            stable_uuid("org.trustbroker.policy.baseline.clip", None)
        );
        assert_eq!(uuid.len(), 36);
        assert_eq!(uuid, uuid.to_uppercase());
        assert!(uuid::Uuid::parse_str(uuid).is_ok());
        let content = t["PayloadContent"].as_array().unwrap();
        let clip = content[0].as_dictionary().unwrap();
        assert_eq!(
            clip["PayloadIdentifier"].as_string(),
            Some("org.trustbroker.policy.baseline.clip.0")
        );
        assert_eq!(clip["PayloadVersion"].as_signed_integer(), Some(1));
        assert_eq!(clip["Icon"].as_data(), Some(&b"hello"[..]));
        assert_ne!(
            clip["PayloadUUID"],
            content[1].as_dictionary().unwrap()["PayloadUUID"]
        );
        assert_eq!(
            content[1].as_dictionary().unwrap()["PayloadIdentifier"].as_string(),
            Some("my.own")
        );
    }

    #[test]
    fn values_convert_by_schema_type() {
        let text = policy(
            "convert",
            "profiles:\n\
             \x20 - name: p\n\
             \x20   payloads:\n\
             \x20     - { PayloadType: com.apple.webClip.managed, Label: L, URL: u, Icon: \"not base64!\" }\n\
             \x20     - { PayloadType: com.apple.mobiledevice.passwordpolicy, minLength: }\n\
             \x20     - { PayloadType: com.apple.wifi.managed, SSID_STR: 1234 }\n\
             \x20     - { PayloadType: com.apple.wifi.managed, EAPClientConfiguration: [] }\n",
        );
        assert_eq!(
            errors(&[("convert.yaml", &text)]),
            [
                "convert.yaml:8:75: `Icon`: expected <data> as base64 text: Invalid symbol 33, \
                 offset 9.",
                "convert.yaml:9:74: `minLength`: no value: a property list has no null; give a \
                 value or leave the key out",
                "convert.yaml:10:58: `SSID_STR`: expected <string>, found the integer 1234 (put it \
                 in quotes to make it text)",
                "convert.yaml:11:72: `EAPClientConfiguration`: expected <dictionary>, found a list",
            ]
        );
    }

    #[test]
    fn structural_mistakes() {
        assert_eq!(
            errors(&[("empty.yaml", "")]),
            ["empty.yaml:1:1: the file is empty; a policy needs name: and targets:"]
        );
        assert_eq!(
            errors(&[("a.yaml", "description: no name\n")]),
            ["a.yaml:1:1: a policy needs name and targets"]
        );
        assert_eq!(
            errors(&[("a.yaml", "name: Bad Name\ntargets: { groups: [] }\n")]),
            [
                "a.yaml:1:7: `Bad Name` is not a valid name: 1 to 64 characters of a-z, 0-9, - \
                 and _",
                "a.yaml:2:20: targets.groups needs at least one group",
            ]
        );
        assert_eq!(
            errors(&[(
                "a.yaml",
                "name: a\ntargets: { groups: [ { provider: ldap } ], platforms: [ios, android] }\n"
            )]),
            [
                "a.yaml:2:22: a group needs id (the provider's stable ID, never a display name)",
                "a.yaml:2:61: unknown platform `android`; expected one of: ios, ipados, macos, \
                 tvos, visionos, watchos",
            ]
        );
        assert_eq!(
            errors(&[("a.yaml", "name: a\nname: b\ntargets: [x]\n")]),
            [
                "a.yaml:2:1: `name` is given twice",
                "a.yaml:3:10: expected targets: a mapping with groups: (and platforms:), found a \
                 list",
            ]
        );
        let syntax = errors(&[("a.yaml", "name: a\ntargets: { groups: [\n")]);
        assert_eq!(syntax.len(), 1, "{syntax:?}");
        assert!(
            syntax[0].starts_with("a.yaml:3:1: did not find expected"),
            "{syntax:?}"
        );
        let two_documents = errors(&[("a.yaml", "name: a\n---\nname: b\n")]);
        assert!(
            two_documents[0].contains("more than one document"),
            "{two_documents:?}"
        );
    }

    #[test]
    fn profiles_apps_and_on_leave_rules() {
        let text = policy(
            "rules",
            "profiles:\n\
             \x20 - { path: wifi.mobileconfig, name: x }\n\
             \x20 - { name: only-a-name }\n\
             \x20 - { path: missing.mobileconfig }\n\
             \x20 - { path: ../outside.mobileconfig }\n\
             \x20 - { path: notes.txt }\n\
             apps:\n\
             \x20 - { bundle_id: com.example.a, itunes_store_id: 1, manifest_url: \"https://x.example/m.plist\" }\n\
             \x20 - { bundle_id: com.example.b, manifest_url: \"http://x.example/m.plist\" }\n\
             \x20 - { bundle_id: com.example.c }\n\
             commands_on_join:\n\
             \x20 - { RequestType: EraseDevice }\n\
             \x20 - { RequestType: DeviceInformation }\n\
             on_leave: { lock: {}, wipe: { after: 400d } }\n",
        );
        assert_eq!(
            errors(&[
                ("rules.yaml", &text),
                ("wifi.mobileconfig", &wifi("org.example.w", "x"))
            ]),
            [
                "rules.yaml:6:5: a profile is either path: (a .mobileconfig file) or name: with \
                 payloads:, not both",
                "rules.yaml:7:5: an inline profile needs payloads:",
                "rules.yaml:8:13: no file `missing.mobileconfig` in the policy set (paths are \
                 relative to the policy file)",
                "rules.yaml:9:13: `../outside.mobileconfig` leaves the policy directory",
                "rules.yaml:10:13: `notes.txt`: a profile file ends in .mobileconfig",
                "rules.yaml:12:5: an app has either itunes_store_id (App Store) or manifest_url \
                 (in-house), not both",
                "rules.yaml:13:47: `http://x.example/m.plist`: a manifest URL is https://HOST/…",
                "rules.yaml:14:5: an app needs itunes_store_id (App Store) or manifest_url \
                 (in-house)",
                "rules.yaml:16:5: EraseDevice cannot be a command on join: destructive actions \
                 belong in on_leave (wipe)",
                "rules.yaml:17:5: DeviceInformation needs Queries",
                "rules.yaml:18:19: lock needs after: (e.g. lock: {after: 24h}), or write lock: \
                 true",
                "rules.yaml:18:38: `400d`: a grace period is at most 366d",
            ]
        );
    }

    #[test]
    fn on_leave_forms() {
        let load = |on_leave: &str| {
            let text = policy("p", &format!("on_leave: {on_leave}\n"));
            load_files(&set(&[("p.yaml", &text)])).map(|s| s.policies[0].on_leave.clone())
        };
        assert_eq!(load("{}").unwrap(), OnLeave::default());
        let locked = load("{ remove: false, lock: true }").unwrap();
        assert_eq!((locked.remove, locked.lock), (false, Some(Duration::ZERO)));
        assert_eq!(load("{ lock: false }").unwrap().lock, None);
        let wiped = load("{ wipe: { after: 72h } }").unwrap();
        assert_eq!(wiped.wipe, Some(Duration::from_secs(72 * 3600)));
        assert_eq!(
            load("{ lock: { after: 30m } }").unwrap().lock,
            Some(Duration::from_secs(1800))
        );
        assert_eq!(
            load("{ lock: { after: 7d } }").unwrap().lock,
            Some(Duration::from_secs(7 * 86400))
        );
        assert_eq!(
            load("{ lock: { after: 3600s } }").unwrap().lock,
            Some(Duration::from_secs(3600))
        );
        assert!(load("{ wipe: {} }").is_err());
    }

    #[test]
    fn relative_paths_resolve_from_the_policy_file() {
        let text = policy(
            "team",
            "profiles:\n  - path: ../profiles/wifi.mobileconfig\n",
        );
        let set = load_files(&set(&[
            ("teams/team.yaml", &text),
            ("profiles/wifi.mobileconfig", &wifi("org.example.w", "x")),
            ("README.md", "not read"),
        ]))
        .unwrap();
        assert_eq!(set.policies[0].file, "teams/team.yaml");
        assert_eq!(set.policies[0].profiles[0].identifier, "org.example.w");
    }

    #[test]
    fn mobileconfig_problems_name_the_file_and_key() {
        let mut bad = wifi("org.example.w", "x");
        bad = bad.replace("<key>SSID_STR</key>", "<key>SSID</key>");
        let text = policy(
            "p",
            "profiles:\n  - path: bad.mobileconfig\n  - path: signed.mobileconfig\n  - path: ours.mobileconfig\n",
        );
        let errors = errors(&[
            ("p.yaml", &text),
            ("bad.mobileconfig", &bad),
            ("signed.mobileconfig", "\u{30}\u{80}\u{06}\u{09}"),
            (
                "ours.mobileconfig",
                &wifi("org.trustbroker.enrollment.x", "x"),
            ),
        ]);
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(
            errors[0].starts_with("bad.mobileconfig:")
                && errors[0].ends_with(
                    "PayloadContent[0].SSID: unknown key `SSID` in com.apple.wifi.managed; did \
                     you mean `SSID_STR`?"
                ),
            "{errors:#?}"
        );
        let line = bad
            .lines()
            .position(|l| l.contains("<key>SSID</key>"))
            .unwrap()
            + 1;
        assert!(
            errors[0].starts_with(&format!("bad.mobileconfig:{line}:")),
            "{errors:#?}"
        );
        assert!(errors[1].starts_with("ours.mobileconfig:"), "{errors:#?}");
        assert!(errors[1].contains("reserved"), "{errors:#?}");
        assert_eq!(
            errors[2],
            "signed.mobileconfig: a signed (CMS) profile: give the unsigned profile; the broker \
             signs what it sends"
        );
    }

    #[test]
    fn conflicts_across_the_set_name_both_files() {
        let a = policy(
            "a",
            "profiles:\n  - path: w1.mobileconfig\napps:\n  - { bundle_id: com.example.app, itunes_store_id: 1 }\n",
        );
        let b = policy(
            "b",
            "profiles:\n  - path: w2.mobileconfig\napps:\n  - bundle_id: com.example.app\n    itunes_store_id: 1\n    configuration: { k: v }\n",
        );
        let c = policy("a", "");
        assert_eq!(
            errors(&[
                ("a.yaml", &a),
                ("b.yaml", &b),
                ("c.yaml", &c),
                ("w1.mobileconfig", &wifi("org.example.w", "one")),
                ("w2.mobileconfig", &wifi("org.example.w", "two")),
            ]),
            [
                "b.yaml:6:5: profile `org.example.w` is defined differently in a.yaml:6:5; one \
                 identifier must mean one thing across the policy set",
                "b.yaml:8:5: app `com.example.app` is defined differently in a.yaml:8:5; one \
                 identifier must mean one thing across the policy set",
                "c.yaml:1:7: the policy name `a` is already used by a.yaml",
            ]
        );
        // Identical definitions are a union, not a conflict; twice in one policy is a mistake.
        let same = wifi("org.example.w", "one");
        assert!(
            load_files(&set(&[
                ("a.yaml", &a),
                ("b.yaml", &a.replace("name: a", "name: b")),
                ("w1.mobileconfig", &same),
            ]))
            .is_ok()
        );
        let twice = policy(
            "t",
            "apps:\n  - { bundle_id: x.y, itunes_store_id: 1 }\n  - { bundle_id: x.y, itunes_store_id: 1 }\n",
        );
        assert_eq!(
            errors(&[("t.yaml", &twice)]),
            ["t.yaml:7:5: app `x.y` is listed twice in this policy (first at line 6)"]
        );
    }

    #[test]
    fn bounds_are_enforced() {
        let ok = policy("p", "");
        let many: BTreeMap<String, Vec<u8>> = (0..=MAX_FILES)
            .map(|i| (format!("p{i}.mobileconfig"), Vec::new()))
            .collect();
        assert!(
            load_files(&many).unwrap_err()[0]
                .message
                .contains("at most 1000")
        );

        let mut large = set(&[("p.yaml", &ok)]);
        large.insert("big.mobileconfig".into(), vec![b' '; MAX_FILE_BYTES + 1]);
        assert_eq!(
            shown(&load_files(&large).unwrap_err()),
            ["big.mobileconfig: the file is larger than 1024 KiB"]
        );

        let total: BTreeMap<String, Vec<u8>> = (0..17)
            .map(|i| (format!("p{i}.mobileconfig"), vec![b' '; MAX_FILE_BYTES]))
            .collect();
        assert!(
            load_files(&total).unwrap_err()[0]
                .message
                .contains("16 MiB")
        );

        for bad in [
            "../p.yaml",
            "/etc/p.yaml",
            "a//p.yaml",
            "./p.yaml",
            "a\\p.yaml",
            "",
        ] {
            let files = set(&[(bad, &ok)]);
            assert!(load_files(&files).is_err(), "{bad}");
        }

        // Too many problems in one file: reading stops, and says so.
        let mut text = policy("p", "apps:\n");
        for i in 0..40 {
            text.push_str(&format!("  - {{ bundle_id: a{i}, itunes_store_id: -1 }}\n"));
        }
        let errors = errors(&[("p.yaml", &text)]);
        assert_eq!(errors.len(), MAX_PROBLEMS_PER_FILE + 1);
        assert!(errors[0].contains("stopped reading"), "{}", errors[0]);
    }

    #[test]
    fn read_dir_files_takes_policies_and_profiles_only() {
        let dir = tempfile::tempdir().unwrap();
        let write = |path: &str, text: &str| {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write(
            "a.yaml",
            &policy("a", "profiles:\n  - path: profiles/w.mobileconfig\n"),
        );
        write("team/b.yml", &policy("b", ""));
        write("profiles/w.mobileconfig", &wifi("org.example.w", "x"));
        write("README.md", "docs");
        write(".git/config.yaml", "not a policy");
        write(".hidden.yaml", "not a policy");
        let files = read_dir_files(dir.path()).unwrap();
        let paths: Vec<&str> = files.keys().map(String::as_str).collect();
        assert_eq!(paths, ["a.yaml", "profiles/w.mobileconfig", "team/b.yml"]);
        let set = load_dir(dir.path()).unwrap();
        assert_eq!(set.policies.len(), 2);

        // The digest covers what was read, and only that.
        write("README.md", "changed");
        assert_eq!(load_dir(dir.path()).unwrap().digest, set.digest);
        write("profiles/w.mobileconfig", &wifi("org.example.w", "y"));
        assert_ne!(load_dir(dir.path()).unwrap().digest, set.digest);

        std::fs::write(dir.path().join("big.yaml"), vec![b'#'; MAX_FILE_BYTES + 1]).unwrap();
        let err = read_dir_files(dir.path()).unwrap_err();
        assert_eq!(shown(&err), ["big.yaml: the file is larger than 1024 KiB"]);
        assert!(read_dir_files(&dir.path().join("absent")).is_err());
    }

    #[test]
    fn schema_for_editors_matches_the_loader() {
        let text = std::fs::read_to_string(root().join("policies/policy.schema.json")).unwrap();
        let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
        let listed: Vec<&str> = schema["$defs"]["payloadType"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let mut known = apple_schema::payload_types();
        known.retain(|t| *t != "com.apple.mdm");
        assert_eq!(listed, known, "run tools/apple-payload-keys.py");
        let keys: Vec<&str> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = POLICY_KEYS.to_vec();
        expected.sort();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, expected);
        let on_join: Vec<&str> =
            schema["properties"]["commands_on_join"]["items"]["properties"]["RequestType"]["enum"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
        let mut typed: Vec<&str> = commands::typed_request_types()
            .filter(|t| !NOT_ON_JOIN.iter().any(|(n, _)| n == t))
            .collect();
        typed.sort();
        assert_eq!(on_join, typed);
    }

    #[test]
    fn a_large_file_loads_and_the_work_is_bounded() {
        // About 256 KiB of YAML, with a problem in each of its first entries.
        let mut text = policy("big", "apps:\n");
        let mut count = 0;
        while text.len() < 256 * 1024 {
            let store_id = if count < 30 { -1 } else { 1 };
            text.push_str(&format!(
                "  - {{ bundle_id: com.example.app{count}, itunes_store_id: {store_id} }}\n"
            ));
            count += 1;
        }
        assert_eq!(
            errors(&[("big.yaml", &text)]).len(),
            MAX_PROBLEMS_PER_FILE + 1
        );
        let clean = text.replace("itunes_store_id: -1", "itunes_store_id: 1");
        let set = load_files(&set(&[("big.yaml", &clean)])).unwrap();
        assert_eq!(set.policies[0].apps.len(), count);

        // Broken files cost a pass per problem: a budget stops the work, and says so.
        let files: BTreeMap<String, Vec<u8>> = (0..4)
            .map(|n| {
                let text = text.replace("name: big", &format!("name: p{n}"));
                (format!("p{n}.yaml"), text.into_bytes())
            })
            .collect();
        let errors = shown(&load_within(&files, 40 * text.len()).unwrap_err());
        assert_eq!(
            errors[0],
            "(policy set): checking stopped: the policy set has too many problems in too much YAML; fix the \
             problems reported so far"
        );
    }

    #[test]
    fn durations() {
        let d = |s: &str| duration(Scalar::Str(s));
        assert_eq!(d("72h"), Ok(Duration::from_secs(72 * 3600)));
        assert_eq!(d("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "h",
            "72",
            "7 d",
            "-1h",
            "1.5h",
            "1w",
            "72H",
            "99999999999999999999d",
        ] {
            assert!(d(bad).is_err(), "{bad}");
        }
        assert!(duration(Scalar::Signed(72)).is_err());
    }
}
