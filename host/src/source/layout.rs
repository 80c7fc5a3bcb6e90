//! The events table must have the pupsourcing layout. It is checked once at start, so that a
//! table with a missing column or another column type is refused with every such column named,
//! instead of failing each batch (and so that rows after a result's first can be decoded
//! without per-row type checks).

use sqlx::PgConnection;

const TEXT: &[&str] = &["text", "varchar", "bpchar", "name"];

/// Column, and the PostgreSQL types (`pg_type.typname`) the host can decode it from. `None`:
/// any type (the reader casts it to text).
const COLUMNS: &[(&str, Option<&[&str]>)] = &[
    ("global_position", Some(&["int8"])),
    ("bounded_context", Some(TEXT)),
    ("aggregate_type", Some(TEXT)),
    ("aggregate_id", Some(TEXT)),
    ("aggregate_version", Some(&["int8"])),
    ("event_id", Some(&["uuid"])),
    ("event_type", Some(TEXT)),
    ("event_version", Some(&["int4"])),
    ("payload", Some(&["bytea"])),
    ("metadata", None),
    ("trace_id", Some(TEXT)),
    ("correlation_id", Some(TEXT)),
    ("causation_id", Some(TEXT)),
    ("created_at", Some(&["timestamptz"])),
];

/// Each way `table` (which exists, with oid `table_oid`) differs from the columns the reader
/// selects and the types it can decode them from; empty when it has the layout.
pub async fn problems(conn: &mut PgConnection, table_oid: i64) -> Result<Vec<String>, sqlx::Error> {
    let found: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT a.attname::text, t.typname::text, format_type(a.atttypid, a.atttypmod)
           FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
          WHERE a.attrelid = $1::oid AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(table_oid)
    .fetch_all(conn)
    .await?;
    Ok(COLUMNS
        .iter()
        .filter_map(
            |(column, accepted)| match found.iter().find(|(name, _, _)| name == column) {
                None => Some(format!("column {column} is missing")),
                Some((_, type_name, shown)) => accepted
                    .filter(|types| !types.contains(&type_name.as_str()))
                    .map(|types| {
                        let expected: Vec<&str> = types.iter().map(|t| readable(t)).collect();
                        format!(
                            "column {column} is {shown}, expected {}",
                            expected.join(" or ")
                        )
                    }),
            },
        )
        .collect())
}

/// The name `format_type` shows for a type, so that expected and found read alike.
fn readable(type_name: &str) -> &str {
    match type_name {
        "int8" => "bigint",
        "int4" => "integer",
        "varchar" => "character varying",
        "bpchar" => "character",
        "timestamptz" => "timestamp with time zone",
        other => other,
    }
}
