//! Version 2 of bank-balances: the same balances, plus the largest deposit per account. Its
//! setup upgrades a version 1 table in place (continue mode) or creates the new shape (rebuild).

use projection_sdk::prelude::*;

struct BankBalancesV2;

#[derive(Deserialize)]
struct Movement {
    amount: i64,
}

impl Projection for BankBalancesV2 {
    fn describe() -> Descriptor {
        Descriptor::new("bank_balances", "2.0.0")
            .bounded_contexts(["Bank"])
            .aggregate_types(["Account"])
            .event_types(["Deposited", "Withdrawn"])
    }

    fn setup() -> Result<(), Error> {
        sql::execute(
            "CREATE TABLE IF NOT EXISTS account_balances (
                 account_id      TEXT PRIMARY KEY,
                 balance         BIGINT NOT NULL,
                 event_count     BIGINT NOT NULL,
                 last_position   BIGINT NOT NULL,
                 largest_deposit BIGINT NOT NULL DEFAULT 0
             )",
            &[],
        )?;
        sql::execute(
            "ALTER TABLE account_balances ADD COLUMN IF NOT EXISTS largest_deposit BIGINT NOT NULL DEFAULT 0",
            &[],
        )?;
        Ok(())
    }

    fn handle(event: &Event<'_>) -> Result<(), HandlerError> {
        let amount = event.json::<Movement>()?.amount;
        let key = [event.aggregate_id().into()];
        match event.event_type() {
            "Deposited" => read_model::upsert(
                "account_balances",
                &key,
                &[
                    add("balance", amount),
                    add("event_count", 1),
                    max("last_position", event.position()),
                    max("largest_deposit", amount),
                ],
            )?,
            "Withdrawn" => read_model::upsert(
                "account_balances",
                &key,
                &[
                    add("balance", -amount),
                    add("event_count", 1),
                    max("last_position", event.position()),
                ],
            )?,
            _ => {}
        }
        Ok(())
    }
}

export_projection!(BankBalancesV2);
