//! Bytes -> a checked, compiled projection component.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::bindings::{ProjectionPre, INTERFACE, INTERFACE_VERSION};
use super::instance::PluginInstance;
use super::Runtime;
use crate::source::Subscription;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("plugin {path} is not a WebAssembly file (it does not start with \\0asm)")]
    NotWasm { path: PathBuf },
    #[error(
        "plugin {path} is a core WebAssembly module, not a component; build it with \
         `cargo build --release --target wasm32-wasip2` (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule { path: PathBuf },
    #[error("plugin {path} is not a valid component: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "plugin {path} does not implement {INTERFACE}/handler (it exports: {exports}); \
         build it with projection-guest-sdk or against wit/projection.wit"
    )]
    NotAProjection { path: PathBuf, exports: String },
    #[error(
        "plugin {path} was built for {INTERFACE}@{found}, but this host implements \
         {INTERFACE}@{INTERFACE_VERSION}; rebuild it against a matching SDK"
    )]
    IncompatibleInterface { path: PathBuf, found: String },
    #[error("plugin {path} needs imports this host does not provide: {reason}")]
    UnsupportedImports { path: PathBuf, reason: String },
    #[error("plugin {path} failed while describing itself: {reason}")]
    Describe { path: PathBuf, reason: String },
    #[error("plugin {path} describes itself with the invalid name '{name}': {reason}")]
    InvalidName {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error("plugin {path} describes itself with {reason}")]
    InvalidDescriptor { path: PathBuf, reason: String },
}

/// Longest plugin version string (it becomes a metric label and appears in every log line).
pub const MAX_VERSION_BYTES: usize = 64;
/// Most entries per subscription list, and longest entry.
pub const MAX_SUBSCRIPTION_ENTRIES: usize = 256;
pub const MAX_SUBSCRIPTION_ENTRY_BYTES: usize = 255;

/// The descriptor's other strings are bounded: they reach metric labels, logs and SQL
/// parameters on every batch.
fn validate_descriptor(d: &super::bindings::types::Descriptor) -> Result<(), String> {
    if d.version.len() > MAX_VERSION_BYTES {
        return Err(format!(
            "a version string of {} bytes; at most {MAX_VERSION_BYTES} are allowed",
            d.version.len()
        ));
    }
    if d.version.is_empty() || d.version.chars().any(|c| c.is_control() || c == '"') {
        return Err(format!(
            "the version '{}'; use printable characters without quotes (e.g. 1.2.0)",
            crate::base::text::bounded(&d.version, 80)
        ));
    }
    let s = &d.subscription;
    for (list, entries) in [
        ("bounded contexts", &s.bounded_contexts),
        ("aggregate types", &s.aggregate_types),
        ("event types", &s.event_types),
    ] {
        if entries.len() > MAX_SUBSCRIPTION_ENTRIES {
            return Err(format!(
                "{} subscribed {list}; at most {MAX_SUBSCRIPTION_ENTRIES} are allowed",
                entries.len()
            ));
        }
        if let Some(long) = entries
            .iter()
            .find(|e| e.len() > MAX_SUBSCRIPTION_ENTRY_BYTES)
        {
            return Err(format!(
                "a subscribed entry of {} bytes among its {list}; at most {MAX_SUBSCRIPTION_ENTRY_BYTES} are allowed",
                long.len()
            ));
        }
    }
    Ok(())
}

/// A projection component that passed every check: compiled, linked, and described.
pub struct Plugin {
    pub name: Arc<str>,
    pub version: String,
    pub subscription: Subscription,
    pub sha256: String,
    pub source: PathBuf,
    pub(super) pre: ProjectionPre<super::state::StoreState>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("sha256", &self.sha256)
            .field("source", &self.source)
            .finish()
    }
}

impl Runtime {
    /// Checks and compiles a component (`path` names it in errors), then asks it to describe
    /// itself. The returned instance is the one that described itself, ready for work.
    pub async fn load_bytes(
        &self,
        path: &Path,
        bytes: &[u8],
    ) -> Result<(Arc<Plugin>, PluginInstance), LoadError> {
        let path = path.to_path_buf();
        match bytes.get(..8) {
            Some([0, b'a', b's', b'm', 0x0d, 0, 1, 0]) => {}
            Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => return Err(LoadError::CoreModule { path }),
            _ => return Err(LoadError::NotWasm { path }),
        }
        let sha256 = hex::encode(Sha256::digest(bytes));
        // Compiling takes a core for ~50-100 ms. Tell tokio, so that other tasks move away, and
        // compile on a thread of lower CPU priority, so that on a busy node the running
        // projections' batches (and PostgreSQL) keep their share of the cores meanwhile.
        let component = tokio::task::block_in_place(|| {
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        lower_thread_priority();
                        self.compile(&path, bytes, &sha256)
                    })
                    .join()
            })
        })
        .map_err(|_| LoadError::Invalid {
            path: path.clone(),
            reason: "compiling it crashed the compiler thread".into(),
        })??;
        self.check_interface(&path, &component)?;
        let instance_pre =
            self.linker
                .instantiate_pre(&component)
                .map_err(|e| LoadError::UnsupportedImports {
                    path: path.clone(),
                    reason: format!("{e:#}"),
                })?;
        let pre = ProjectionPre::new(instance_pre).map_err(|e| LoadError::NotAProjection {
            path: path.clone(),
            exports: format!("{e:#}"),
        })?;
        let mut instance = PluginInstance::new(self, &pre, Arc::from("<loading>"))
            .await
            .map_err(|e| LoadError::Describe {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let descriptor = instance.describe().await.map_err(|e| LoadError::Describe {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        validate_name(&descriptor.name).map_err(|reason| LoadError::InvalidName {
            path: path.clone(),
            name: crate::base::text::bounded(&descriptor.name, 64),
            reason,
        })?;
        validate_descriptor(&descriptor).map_err(|reason| LoadError::InvalidDescriptor {
            path: path.clone(),
            reason,
        })?;
        let name: Arc<str> = Arc::from(descriptor.name.as_str());
        instance.set_projection(name.clone());
        let plugin = Plugin {
            name,
            version: descriptor.version,
            subscription: Subscription {
                bounded_contexts: descriptor.subscription.bounded_contexts,
                aggregate_types: descriptor.subscription.aggregate_types,
                event_types: descriptor.subscription.event_types,
            },
            sha256,
            source: path,
            pre,
        };
        tracing::debug!(projection = %plugin.name, version = %plugin.version, sha256 = %&plugin.sha256[..12], "plugin loaded and described");
        Ok((Arc::new(plugin), instance))
    }

    /// Compiles, or reuses the component compiled earlier for the same bytes and engine (by this
    /// process, or in the cache directory).
    fn compile(&self, path: &Path, bytes: &[u8], sha256: &str) -> Result<Component, LoadError> {
        let known = self
            .compiled
            .lock()
            .ok()
            .and_then(|c| c.get(sha256).cloned());
        if let Some(component) = known {
            return Ok(component);
        }
        let component = self.compile_or_reuse(path, bytes, sha256)?;
        if let Ok(mut compiled) = self.compiled.lock() {
            compiled.insert(sha256.to_string(), component.clone());
        }
        Ok(component)
    }

    /// Compiles, or reuses the artifact of the on-disk cache.
    fn compile_or_reuse(
        &self,
        path: &Path,
        bytes: &[u8],
        sha256: &str,
    ) -> Result<Component, LoadError> {
        let started = std::time::Instant::now();
        let cached = self
            .config
            .cache_dir
            .as_ref()
            .map(|dir| dir.join(format!("{sha256}-{}.cwasm", self.compatibility())));
        if let Some(file) = cached.as_ref().filter(|f| f.is_file()) {
            // SAFETY: the cache directory holds only artifacts this host wrote itself (below),
            // named by the hash of their source and of the engine that compiled them.
            match unsafe { Component::deserialize_file(&self.engine, file) } {
                Ok(component) => {
                    tracing::debug!(file = %file.display(), ms = started.elapsed().as_millis() as u64, "reused a compiled plugin");
                    return Ok(component);
                }
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "ignoring an unusable compiled plugin; compiling again")
                }
            }
        }
        // At info: a component of a Python or JS toolchain takes seconds to compile, and a
        // host that says nothing meanwhile looks stuck.
        tracing::info!(file = %path.display(), bytes = bytes.len(), "compiling a plugin (PLUGIN_CACHE_DIR keeps the result across restarts)");
        let component = Component::new(&self.engine, bytes).map_err(|e| LoadError::Invalid {
            path: path.to_path_buf(),
            reason: format!("{e:#}"),
        })?;
        tracing::info!(file = %path.display(), ms = started.elapsed().as_millis() as u64, "compiled a plugin");
        if let Some(file) = cached {
            let written = component
                .serialize()
                .map_err(std::io::Error::other)
                .and_then(|artifact| {
                    let dir = file.parent().expect("cache files live in a directory");
                    std::fs::create_dir_all(dir)?;
                    let tmp = dir.join(format!(".{}.tmp", rand::random::<u64>()));
                    std::fs::write(&tmp, artifact)?;
                    std::fs::rename(&tmp, &file)
                });
            if let Err(e) = written {
                tracing::warn!(file = %file.display(), error = %e, "could not cache the compiled plugin (set PLUGIN_CACHE_DIR to a writable directory)");
            }
        }
        Ok(component)
    }

    fn check_interface(&self, path: &Path, component: &Component) -> Result<(), LoadError> {
        let exports: Vec<String> = component
            .component_type()
            .exports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        let prefix = format!("{INTERFACE}/handler@");
        let Some(found) = exports.iter().find_map(|e| e.strip_prefix(&prefix)) else {
            return Err(LoadError::NotAProjection {
                path: path.to_path_buf(),
                exports: if exports.is_empty() {
                    "nothing".into()
                } else {
                    exports.join(", ")
                },
            });
        };
        if !compatible(found, INTERFACE_VERSION) {
            return Err(LoadError::IncompatibleInterface {
                path: path.to_path_buf(),
                found: found.to_string(),
            });
        }
        Ok(())
    }
}

/// Semver compatibility as cargo reads it: same major, and same minor while major is 0, and
/// not newer than what the host implements.
fn compatible(found: &str, ours: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64, u64)> {
        let mut it = v.split(['.', '-', '+']).map(|p| p.parse::<u64>().ok());
        Some((it.next()??, it.next()??, it.next()??))
    };
    match (parse(found), parse(ours)) {
        (Some(f), Some(o)) if o.0 == 0 => f.0 == 0 && f.1 == o.1 && f.2 <= o.2,
        (Some(f), Some(o)) => f.0 == o.0 && (f.1, f.2) <= (o.1, o.2),
        _ => false,
    }
}

/// Projection names become checkpoint keys, schema names and metric labels.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(
            "use lowercase letters, digits and '_', starting with a letter, at most 48 characters"
                .into(),
        )
    }
}

/// The compiled-component cache holds native code the host runs without checking it again, so
/// it must be private to the host's user: created with mode 0700 when missing, refused when it
/// belongs to another user or other users may write it.
pub fn prepare_cache_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot create the compiled-plugin cache {} (PLUGIN_CACHE_DIR): {e};                          point PLUGIN_CACHE_DIR at a writable private directory, or set it empty to disable the cache",
                        dir.display()
                    )
                })?;
            Ok(())
        }
        Err(e) => anyhow::bail!(
            "cannot read the compiled-plugin cache {} (PLUGIN_CACHE_DIR): {e}",
            dir.display()
        ),
        Ok(meta) => {
            let me = effective_uid();
            if !meta.is_dir() {
                anyhow::bail!(
                    "the compiled-plugin cache {} (PLUGIN_CACHE_DIR) is not a directory (a symbolic link or a file);                      the host runs the native code kept there, so it must be a private directory of its own",
                    dir.display()
                );
            }
            if meta.uid() != me {
                anyhow::bail!(
                    "the compiled-plugin cache {} (PLUGIN_CACHE_DIR) belongs to user {}, not to the host's user {me};                      the host runs the native code kept there, so another user must not control it: use a directory of the host's own",
                    dir.display(),
                    meta.uid()
                );
            }
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o022 != 0 {
                anyhow::bail!(
                    "the compiled-plugin cache {} (PLUGIN_CACHE_DIR) can be written by other users (mode {mode:o});                      the host runs the native code kept there: chmod 700 {}, or use a private directory",
                    dir.display(),
                    dir.display()
                );
            }
            Ok(())
        }
    }
}

/// The effective user id of this process.
fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Raises the calling thread's nice value (a per-thread attribute on Linux). Best effort: a
/// failure only means the compile competes at normal priority.
fn lower_thread_priority() {
    // SAFETY: setpriority on the calling thread's own id has no memory effects.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_versions_follow_semver_compatibility() {
        assert!(compatible("0.1.0", "0.1.0"));
        assert!(!compatible("0.2.0", "0.1.0"));
        assert!(
            !compatible("0.1.1", "0.1.0"),
            "a newer guest may use functions we lack"
        );
        assert!(compatible("0.1.0", "0.1.3"));
        assert!(compatible("1.2.0", "1.4.0"));
        assert!(!compatible("2.0.0", "1.4.0"));
        assert!(!compatible("garbage", "0.1.0"));
    }

    #[test]
    fn projection_names_must_be_safe_identifiers() {
        assert!(validate_name("bank_balances").is_ok());
        assert!(validate_name("Bank").is_err());
        assert!(validate_name("1abc").is_err());
        assert!(validate_name("a-b").is_err());
        assert!(validate_name(&"a".repeat(49)).is_err());
    }
}
