//! A throwaway local PostgreSQL for the demo and the benchmarks when no DATABASE_URL is given:
//! `initdb` into a temporary directory, `pg_ctl start` on a free local port, and stop and remove
//! everything when dropped.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

pub struct DevDatabase {
    dir: PathBuf,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
    port: u16,
    pub url: String,
}

impl DevDatabase {
    /// Starts a server and returns once it accepts connections.
    pub fn start() -> anyhow::Result<DevDatabase> {
        let db = DevDatabase::init()?;
        db.start_server()?;
        eprintln!(
            "No DATABASE_URL given: started a throwaway PostgreSQL at {} (data in {}, removed on exit).",
            db.url,
            db.dir.display()
        );
        Ok(db)
    }

    /// Creates the cluster (on a free port) without starting it, so that its configuration
    /// can be changed first (TLS, `pg_hba.conf`).
    pub fn init() -> anyhow::Result<DevDatabase> {
        let bin = find_binaries().context(
            "no DATABASE_URL was given and no PostgreSQL server binaries (initdb, pg_ctl) were found to start a \
             throwaway one. Either set DATABASE_URL=postgres://user:password@host:5432/db, or install the server: \
             Debian/Ubuntu `apt-get install postgresql`, Fedora `dnf install postgresql-server`, macOS `brew install postgresql`",
        )?;
        let dir =
            std::env::temp_dir().join(format!("projection-host-pg-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // PostgreSQL refuses to run as root; run it as the `postgres` (or `nobody`) user then.
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(unprivileged_user()?)
        } else {
            None
        };
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .context("handing the temporary directory to the server user")?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let port = free_port()?;
        let db = DevDatabase {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            bin,
            run_as,
            port,
        };
        let data = db.dir.join("data");
        db.command("initdb")
            .args(["-D"])
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ])
            .run_quietly()
            .context("initdb failed")?;
        Ok(db)
    }

    /// Starts the server and returns once it accepts connections.
    pub fn start_server(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c full_page_writes=off \
             -c shared_buffers=256MB -c max_connections=200",
            self.port,
            self.dir.display()
        );
        self.command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-o", &options, "-l"])
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "start"])
            .run_quietly()
            .with_context(|| {
                format!(
                    "starting the throwaway PostgreSQL failed (log: {})",
                    self.dir.join("server.log").display()
                )
            })
    }

    /// Stops the server (fast: open sessions are ended), keeping its data.
    pub fn stop_server(&self) -> anyhow::Result<()> {
        self.command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "-t", "60", "stop"])
            .run_quietly()
            .context("stopping the throwaway PostgreSQL")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of the server's Unix socket.
    pub fn socket_dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Writes a file into the data directory, owned by the server's user and readable only by
    /// it (as PostgreSQL demands of a TLS key).
    pub fn write_data_file(&self, name: &str, contents: &[u8]) -> anyhow::Result<()> {
        let path = self.data_dir().join(name);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    /// Restarts the server (fast shutdown: open sessions are ended), keeping its data.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-m", "fast", "-w", "-t", "60", "restart"])
            .run_quietly()
            .context("restarting the throwaway PostgreSQL")
    }

    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(tool));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(&self.dir);
        cmd
    }
}

impl Drop for DevDatabase {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

trait RunQuietly {
    fn run_quietly(&mut self) -> anyhow::Result<()>;
}

impl RunQuietly for Command {
    fn run_quietly(&mut self) -> anyhow::Result<()> {
        let out = self
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {:?}", self.get_program()))?;
        if !out.status.success() {
            bail!(
                "{:?} exited with {}: {}{}",
                self.get_program(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// `initdb` and `pg_ctl` from PATH, else from the newest /usr/lib/postgresql/<v>/bin (Debian).
fn find_binaries() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Ok(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version: u32 = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .context("initdb/pg_ctl not found")
}

fn unprivileged_user() -> anyhow::Result<(u32, u32)> {
    for name in ["postgres", "nobody"] {
        let cname = std::ffi::CString::new(name).expect("no NUL");
        // SAFETY: getpwnam returns a pointer to static storage or NULL; we copy the ids out at once.
        let entry = unsafe { libc::getpwnam(cname.as_ptr()) };
        if !entry.is_null() {
            let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
            return Ok((uid, gid));
        }
    }
    bail!("running as root, and neither a 'postgres' nor a 'nobody' user exists to run the throwaway PostgreSQL")
}

fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free local port")?;
    Ok(listener.local_addr()?.port())
}
