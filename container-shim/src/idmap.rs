//! User-namespace id maps: which host uids and gids an unprivileged container's ids 0.. stand
//! for. The range comes from the config, else from root's entries in /etc/subuid and
//! /etc/subgid (as LXD reads them), else from the default range 1000000:1000000000.

use std::io;
use std::path::Path;

/// The first host id of the default range (LXD's default).
pub const DEFAULT_BASE: u32 = 1_000_000;
/// How many ids the default range holds (LXD's default).
pub const DEFAULT_SIZE: u32 = 1_000_000_000;

#[derive(Debug, thiserror::Error)]
pub enum IdMapError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} line {line}: expected user:first-id:count, such as root:1000000:1000000000")]
    Syntax { path: String, line: usize },
    #[error("cannot write the {kind} map of process {pid}: {source}")]
    Write {
        kind: &'static str,
        pid: i32,
        #[source]
        source: io::Error,
    },
}

/// One contiguous range: container ids 0..size are host ids host_base..host_base+size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub host_base: u32,
    pub size: u32,
}

/// The uid and gid ranges of one container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub uid: IdRange,
    pub gid: IdRange,
}

impl IdMap {
    /// The same range for uids and gids.
    pub fn uniform(host_base: u32, size: u32) -> Self {
        let range = IdRange { host_base, size };
        Self {
            uid: range,
            gid: range,
        }
    }

    /// Root's ranges from /etc/subuid and /etc/subgid, or the default range for whichever file
    /// is missing or has no entry for root.
    pub fn for_host() -> Result<Self, IdMapError> {
        let default = IdRange {
            host_base: DEFAULT_BASE,
            size: DEFAULT_SIZE,
        };
        Ok(Self {
            uid: read_subordinate_file(Path::new("/etc/subuid"))?.unwrap_or(default),
            gid: read_subordinate_file(Path::new("/etc/subgid"))?.unwrap_or(default),
        })
    }

    /// Writes this map as the uid and gid map of the process `pid`, which must be in a fresh
    /// user namespace.
    pub fn write_to(&self, pid: i32) -> Result<(), IdMapError> {
        for (kind, range) in [("uid", self.uid), ("gid", self.gid)] {
            std::fs::write(
                format!("/proc/{pid}/{kind}_map"),
                format!("0 {} {}\n", range.host_base, range.size),
            )
            .map_err(|source| IdMapError::Write { kind, pid, source })?;
        }
        Ok(())
    }
}

fn read_subordinate_file(path: &Path) -> Result<Option<IdRange>, IdMapError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_subordinate(&text, &path.display().to_string()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IdMapError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Root's first range in the text of a subuid or subgid file (`user:first-id:count` lines;
/// root may be named `root` or `0`).
pub fn parse_subordinate(text: &str, path: &str) -> Result<Option<IdRange>, IdMapError> {
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let syntax = || IdMapError::Syntax {
            path: path.to_string(),
            line: index + 1,
        };
        let mut fields = line.split(':');
        let (Some(user), Some(base), Some(size), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(syntax());
        };
        let host_base: u32 = base.parse().map_err(|_| syntax())?;
        let size: u32 = size.parse().map_err(|_| syntax())?;
        if user == "root" || user == "0" {
            return Ok(Some(IdRange { host_base, size }));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_entry_is_found_among_others() {
        let text = "# comment\nalice:100000:65536\nroot:1000000:1000000000\nroot:5:5\n";
        assert_eq!(
            parse_subordinate(text, "/etc/subuid").expect("valid"),
            Some(IdRange {
                host_base: 1_000_000,
                size: 1_000_000_000
            })
        );
        assert_eq!(
            parse_subordinate("0:200000:65536\n", "/etc/subuid").expect("valid"),
            Some(IdRange {
                host_base: 200_000,
                size: 65536
            })
        );
    }

    #[test]
    fn no_root_entry_means_none() {
        assert_eq!(
            parse_subordinate("alice:100000:65536\n\n", "/etc/subgid").expect("valid"),
            None
        );
        assert_eq!(parse_subordinate("", "/etc/subgid").expect("valid"), None);
    }

    #[test]
    fn malformed_lines_are_named() {
        for text in [
            "root:1000000\n",
            "root:x:5\n",
            "root:1:2:3\n",
            "root:1:-2\n",
        ] {
            let error = parse_subordinate(text, "/etc/subuid").expect_err("malformed");
            assert_eq!(
                error.to_string(),
                "/etc/subuid line 1: expected user:first-id:count, such as root:1000000:1000000000"
            );
        }
    }
}
