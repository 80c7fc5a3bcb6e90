//! Exercises the keyed API and plain SQL: each event is one operation on `kv`, and reads are
//! recorded in `observed`, so a test can compare everything with a sequential model.
//!
//! Payload: `{"key": "k1", "value": 5}`; the event type selects the operation.

use projection_sdk::prelude::*;

struct KvOps;

#[derive(Deserialize)]
struct Op {
    key: String,
    #[serde(default)]
    value: i64,
}

impl Projection for KvOps {
    fn describe() -> Descriptor {
        Descriptor::new("kv_ops", "1.0.0").bounded_contexts(["Kv"])
    }

    fn setup() -> Result<(), Error> {
        sql::execute(
            "CREATE TABLE IF NOT EXISTS kv (
                 k TEXT PRIMARY KEY,
                 n BIGINT NOT NULL DEFAULT 0,
                 hi BIGINT,
                 first BIGINT,
                 note TEXT)",
            &[],
        )?;
        sql::execute(
            "CREATE TABLE IF NOT EXISTS observed (seq BIGINT PRIMARY KEY, n BIGINT)",
            &[],
        )?;
        Ok(())
    }

    fn handle(event: &Event<'_>) -> Result<(), HandlerError> {
        let op: Op = event.json()?;
        let key = [Value::from(op.key.as_str())];
        match event.event_type() {
            "add" => read_model::upsert("kv", &key, &[add("n", op.value)])?,
            "set" => read_model::upsert("kv", &key, &[set("n", op.value)])?,
            "max" => read_model::upsert("kv", &key, &[max("hi", op.value)])?,
            "min" => read_model::upsert("kv", &key, &[min("hi", op.value)])?,
            "first" => {
                read_model::upsert("kv", &key, &[set_if_absent("first", op.value), add("n", 1)])?
            }
            "del" => read_model::delete("kv", &key)?,
            "get" => {
                let n = read_model::get("kv", &key)?
                    .and_then(|row| row.into_iter().find(|c| c.column == "n"))
                    .and_then(|c| c.value.as_int());
                read_model::upsert("observed", &[event.position().into()], &[set("n", n)])?;
            }
            "sql" => {
                sql::execute(
                    "UPDATE kv SET note = $2, n = n + 1000 WHERE k = $1",
                    &[
                        op.key.as_str().into(),
                        format!("sql@{}", event.position()).into(),
                    ],
                )?;
            }
            other => return Err(HandlerError::new(format!("unknown op {other}"))),
        }
        Ok(())
    }
}

export_projection!(KvOps);
