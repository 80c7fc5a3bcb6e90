//! A projection that reaches for what it must not have. Each event type is one attempt:
//! reading the events table, changing the host's checkpoints, writing another projection's
//! schema, leaving its role; `Ambient` records what WASI gives it (files, environment, clock,
//! network) in its own table.

use projection_sdk::prelude::*;

struct Intruder;

impl Projection for Intruder {
    fn describe() -> Descriptor {
        Descriptor::new("intruder", "1.0.0").bounded_contexts(["Intrusion"])
    }

    fn setup() -> Result<(), Error> {
        sql::execute(
            "CREATE TABLE IF NOT EXISTS observations (what TEXT PRIMARY KEY, seen TEXT NOT NULL)",
            &[],
        )?;
        Ok(())
    }

    fn handle(event: &Event<'_>) -> Result<(), HandlerError> {
        match event.event_type() {
            "ReadEvents" => {
                sql::query("SELECT count(*) FROM public.events", &[])?;
            }
            "WriteCheckpoint" => {
                sql::execute("UPDATE projection_host.checkpoints SET position = 0", &[])?;
            }
            "WriteOther" => {
                sql::execute(
                    "INSERT INTO bank_balances.account_balances VALUES ('stolen', 1000000, 1, 1)",
                    &[],
                )?;
            }
            "KeyedOther" => {
                read_model::upsert(
                    "bank_balances.account_balances",
                    &["acct-0".into()],
                    &[set("balance", 0)],
                )?;
            }
            "Escape" => {
                // Resets to the session user, which is the projection's own role.
                sql::execute("RESET ROLE", &[])?;
                sql::execute("UPDATE projection_host.checkpoints SET position = 0", &[])?;
            }
            "Ambient" => {
                let observe = |what: &str, seen: String| {
                    read_model::upsert("observations", &[what.into()], &[set("seen", seen)])
                };
                observe(
                    "files",
                    format!(
                        "{:?}",
                        std::fs::read_dir("/")
                            .map(|d| d.count())
                            .map_err(|e| e.kind())
                    ),
                )?;
                observe("env", format!("{}", std::env::vars().count()))?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                observe("clock", format!("{}", now.as_secs()))?;
                observe(
                    "network",
                    format!(
                        "{:?}",
                        std::net::TcpStream::connect("127.0.0.1:5432")
                            .map(|_| ())
                            .map_err(|e| e.kind())
                    ),
                )?;
            }
            _ => {}
        }
        Ok(())
    }
}

export_projection!(Intruder);
