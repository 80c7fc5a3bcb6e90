//! A projection that misbehaves on command, for sandbox and failure tests. It counts events
//! per aggregate in `seen` (with the last position applied, to check order); the event types
//! `Trap`, `Loop`, `Hog` and `Reject` make it panic, spin forever, allocate without bound, or
//! return an error; `RejectUntilFixed` fails until the aggregate is listed in `fixed`.

use projection_sdk::prelude::*;

struct Faulty;

impl Projection for Faulty {
    fn describe() -> Descriptor {
        Descriptor::new("faulty", "1.0.0").bounded_contexts(["Faults"])
    }

    fn setup() -> Result<(), Error> {
        sql::execute(
            "CREATE TABLE IF NOT EXISTS seen (aggregate_id TEXT PRIMARY KEY, n BIGINT NOT NULL, last_position BIGINT)",
            &[],
        )?;
        sql::execute(
            "CREATE TABLE IF NOT EXISTS fixed (aggregate_id TEXT PRIMARY KEY)",
            &[],
        )?;
        Ok(())
    }

    fn handle(event: &Event<'_>) -> Result<(), HandlerError> {
        match event.event_type() {
            "Trap" => panic!("poison event {}", event.position()),
            "Loop" => {
                let mut x: u64 = 1;
                loop {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    std::hint::black_box(x);
                }
            }
            "Hog" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "Reject" => return Err(HandlerError::new("this event is rejected on purpose")),
            "RejectUntilFixed" => {
                let fixed = sql::query(
                    "SELECT 1 FROM fixed WHERE aggregate_id = $1",
                    &[event.aggregate_id().into()],
                )?;
                if fixed.is_empty() {
                    return Err(HandlerError::new(format!(
                        "aggregate {} is not fixed yet",
                        event.aggregate_id()
                    )));
                }
            }
            _ => {}
        }
        read_model::upsert(
            "seen",
            &[event.aggregate_id().into()],
            &[add("n", 1), set("last_position", event.position())],
        )?;
        Ok(())
    }
}

export_projection!(Faulty);
