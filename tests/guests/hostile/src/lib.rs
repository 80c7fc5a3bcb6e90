//! A projection that attacks the host from its event payloads, for the confinement tests. Each
//! event's payload is `{"steps": [...]}`, run in order; the first step that fails fails the
//! event with that step's error (so the dead-letter list shows what PostgreSQL or the host
//! refused). Steps:
//!
//! - `{"execute": SQL}` / `{"query": SQL}`: plain SQL in the batch's transaction;
//! - `{"keep": SQL}`: a query whose first column's values are kept in `loot(what, data)` under
//!   the event's aggregate id (to prove nothing from outside the schema was copied in);
//! - `{"write_bytes": [rows, bytes]}`: keyed writes of `rows` rows of `bytes` bytes each;
//! - `{"error_bytes": n}`: fails with an error message of `n` bytes;
//! - `{"log": text}`: a log line.

use projection_sdk::prelude::*;

struct Hostile;

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Step {
    Execute(String),
    Query(String),
    Keep(String),
    WriteBytes(u64, usize),
    ErrorBytes(usize),
    Log(String),
}

#[derive(Deserialize)]
struct Attack {
    steps: Vec<Step>,
}

impl Projection for Hostile {
    fn describe() -> Descriptor {
        Descriptor::new("hostile", "1.0.0").bounded_contexts(["Hostile"])
    }

    fn setup() -> Result<(), Error> {
        sql::execute(
            "CREATE TABLE IF NOT EXISTS loot (what TEXT NOT NULL, data TEXT)",
            &[],
        )?;
        sql::execute(
            "CREATE TABLE IF NOT EXISTS big (id BIGINT PRIMARY KEY, data TEXT NOT NULL)",
            &[],
        )?;
        sql::execute(
            "CREATE TABLE IF NOT EXISTS applied (position BIGINT PRIMARY KEY, n BIGINT NOT NULL)",
            &[],
        )?;
        Ok(())
    }

    fn handle(event: &Event<'_>) -> Result<(), HandlerError> {
        let attack: Attack = event.json()?;
        for step in attack.steps {
            match step {
                Step::Execute(statement) => {
                    sql::execute(&statement, &[])?;
                }
                Step::Query(statement) => {
                    sql::query(&statement, &[])?;
                }
                Step::Keep(statement) => {
                    for row in sql::query(&statement, &[])? {
                        let data = match row.into_iter().next() {
                            Some(Value::Text(t)) | Some(Value::Json(t)) => Value::Text(t),
                            Some(Value::Int(i)) => Value::Text(i.to_string()),
                            Some(Value::Boolean(b)) => Value::Text(b.to_string()),
                            _ => Value::Null,
                        };
                        sql::execute(
                            "INSERT INTO loot (what, data) VALUES ($1, $2)",
                            &[event.aggregate_id().into(), data],
                        )?;
                    }
                }
                Step::WriteBytes(rows, bytes) => {
                    // One import call per row (not the SDK's gathering), so that the rows pile up
                    // in the host's buffer rather than in the guest's own memory.
                    use projection_sdk::bindings::pupsourcing::projection::read_model as wit;
                    let filler = "x".repeat(bytes);
                    for id in 0..rows {
                        wit::upsert(
                            "big",
                            &[Value::Int(id as i64)],
                            &[wit::Assignment {
                                column: "data".into(),
                                value: Value::Text(filler.clone()),
                                merge: wit::Merge::Set,
                            }],
                        )?;
                    }
                }
                Step::ErrorBytes(n) => {
                    return Err(HandlerError {
                        message: "e".repeat(n),
                        position: Some(event.position()),
                    })
                }
                Step::Log(text) => log::info(&text),
            }
        }
        read_model::upsert("applied", &[event.position().into()], &[add("n", 1)])?;
        Ok(())
    }
}

export_projection!(Hostile);
