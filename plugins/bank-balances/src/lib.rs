//! The W1 reference projection: `account_balances` from `Deposited` / `Withdrawn` events of
//! `Account` aggregates in the `Bank` bounded context (see docs/plugin-guide.md).

use projection_sdk::prelude::*;

struct BankBalances;

#[derive(Deserialize)]
struct Movement {
    amount: i64,
}

impl Projection for BankBalances {
    fn describe() -> Descriptor {
        Descriptor::new("bank_balances", env!("CARGO_PKG_VERSION"))
            .bounded_contexts(["Bank"])
            .aggregate_types(["Account"])
            .event_types(["Deposited", "Withdrawn"])
    }

    fn setup() -> Result<(), Error> {
        sql::execute(
            "CREATE TABLE IF NOT EXISTS account_balances (
                 account_id    TEXT PRIMARY KEY,
                 balance       BIGINT NOT NULL,
                 event_count   BIGINT NOT NULL,
                 last_position BIGINT NOT NULL
             )",
            &[],
        )?;
        Ok(())
    }

    fn handle(event: &Event<'_>) -> Result<(), HandlerError> {
        let amount = event.json::<Movement>()?.amount;
        let delta = match event.event_type() {
            "Deposited" => amount,
            "Withdrawn" => -amount,
            _ => return Ok(()),
        };
        read_model::upsert(
            "account_balances",
            &[event.aggregate_id().into()],
            &[
                add("balance", delta),
                add("event_count", 1),
                max("last_position", event.position()),
            ],
        )?;
        Ok(())
    }
}

export_projection!(BankBalances);
