//! Files and directories that hold secrets: created readable by the owner only.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;

/// Creates `dir` (and parents) if missing, and makes it `0700`.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))?;
    Ok(())
}

/// Creates (or truncates) `path` with permission bits `mode` from the start, so a secret is
/// never briefly readable by others.
pub fn create_with_mode(path: &Path, mode: u32) -> anyhow::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    // `mode` only applies to new files; an existing file keeps its bits unless reset.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting permissions of {}", path.display()))?;
    Ok(file)
}
