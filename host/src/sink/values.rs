//! Values written to and read from read-model columns, checked against the column's type.

use super::schema::ColumnKind;
use super::EffectError;

/// A value in the host's own representation. `Text` also carries every type PostgreSQL can
/// cast from text (numeric, uuid, timestamptz, json ...).
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    Bytes(Vec<u8>),
}

/// The plugin-facing value (mirrors the WIT `value` variant without depending on bindings).
#[derive(Debug, Clone, PartialEq)]
pub enum PluginValue {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
    Boolean(bool),
    Json(String),
    Bytes(Vec<u8>),
}

impl SqlValue {
    /// Converts a plugin value for a column of `kind`, refusing lossy or meaningless pairs.
    pub fn for_column(
        value: PluginValue,
        kind: ColumnKind,
        column: &str,
    ) -> Result<SqlValue, EffectError> {
        use ColumnKind as K;
        use PluginValue as V;
        Ok(match (value, kind) {
            (V::Null, _) => SqlValue::Null,
            (V::Int(v), K::Int) => SqlValue::Int(v),
            (V::Int(v), K::Float) => SqlValue::Float(v as f64),
            (V::Int(v), K::Numeric | K::Text | K::Other) => SqlValue::Text(v.to_string()),
            (V::Float(v), K::Float) => SqlValue::Float(v),
            (V::Float(v), K::Numeric | K::Other) if v.is_finite() => SqlValue::Text(v.to_string()),
            (V::Boolean(v), K::Bool) => SqlValue::Bool(v),
            (V::Text(v), K::Text | K::Numeric | K::Other | K::Json) => SqlValue::Text(v),
            (V::Json(v), K::Json | K::Text) => SqlValue::Text(v),
            (V::Bytes(v), K::Bytes) => SqlValue::Bytes(v),
            (value, kind) => {
                return Err(EffectError::invalid(format!(
                    "column '{column}' has type {} and cannot take {}",
                    kind.describe(),
                    value.describe()
                )))
            }
        })
    }

    /// Bytes of host memory the value holds (for the byte limits).
    pub fn size(&self) -> u64 {
        std::mem::size_of::<SqlValue>() as u64
            + match self {
                SqlValue::Text(v) => v.len() as u64,
                SqlValue::Bytes(v) => v.len() as u64,
                _ => 0,
            }
    }

    pub fn into_plugin(self, kind: ColumnKind) -> PluginValue {
        match (self, kind) {
            (SqlValue::Null, _) => PluginValue::Null,
            (SqlValue::Int(v), _) => PluginValue::Int(v),
            (SqlValue::Float(v), _) => PluginValue::Float(v),
            (SqlValue::Bool(v), _) => PluginValue::Boolean(v),
            (SqlValue::Text(v), ColumnKind::Json) => PluginValue::Json(v),
            (SqlValue::Text(v), _) => PluginValue::Text(v),
            (SqlValue::Bytes(v), _) => PluginValue::Bytes(v),
        }
    }
}

impl PluginValue {
    /// Bytes of host memory the value holds.
    pub fn size(&self) -> u64 {
        std::mem::size_of::<PluginValue>() as u64
            + match self {
                PluginValue::Text(v) | PluginValue::Json(v) => v.len() as u64,
                PluginValue::Bytes(v) => v.len() as u64,
                _ => 0,
            }
    }

    fn describe(&self) -> &'static str {
        match self {
            PluginValue::Null => "null",
            PluginValue::Int(_) => "an int",
            PluginValue::Float(_) => "a float",
            PluginValue::Text(_) => "text",
            PluginValue::Boolean(_) => "a boolean",
            PluginValue::Json(_) => "json",
            PluginValue::Bytes(_) => "bytes",
        }
    }
}

/// A primary-key component, hashable so that writes to the same row coalesce.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyPart {
    Int(i64),
    Bool(bool),
    Text(String),
    Bytes(Vec<u8>),
}

impl KeyPart {
    pub fn for_column(
        value: PluginValue,
        kind: ColumnKind,
        column: &str,
    ) -> Result<KeyPart, EffectError> {
        match SqlValue::for_column(value, kind, column)? {
            SqlValue::Int(v) => Ok(KeyPart::Int(v)),
            SqlValue::Bool(v) => Ok(KeyPart::Bool(v)),
            SqlValue::Text(v) => Ok(KeyPart::Text(v)),
            SqlValue::Bytes(v) => Ok(KeyPart::Bytes(v)),
            SqlValue::Null => Err(EffectError::invalid(format!(
                "key column '{column}' cannot be null"
            ))),
            SqlValue::Float(_) => Err(EffectError::invalid(format!(
                "key column '{column}' is a float; floats cannot identify rows"
            ))),
        }
    }

    /// Bytes of host memory the key part holds.
    pub fn size(&self) -> u64 {
        std::mem::size_of::<KeyPart>() as u64
            + match self {
                KeyPart::Text(v) => v.len() as u64,
                KeyPart::Bytes(v) => v.len() as u64,
                _ => 0,
            }
    }

    pub fn to_sql(&self) -> SqlValue {
        match self {
            KeyPart::Int(v) => SqlValue::Int(*v),
            KeyPart::Bool(v) => SqlValue::Bool(*v),
            KeyPart::Text(v) => SqlValue::Text(v.clone()),
            KeyPart::Bytes(v) => SqlValue::Bytes(v.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints_fit_numeric_columns_and_text_does_not_fit_int_columns() {
        assert_eq!(
            SqlValue::for_column(PluginValue::Int(5), ColumnKind::Int, "n").unwrap(),
            SqlValue::Int(5)
        );
        assert_eq!(
            SqlValue::for_column(PluginValue::Int(5), ColumnKind::Numeric, "n").unwrap(),
            SqlValue::Text("5".into())
        );
        let err =
            SqlValue::for_column(PluginValue::Text("5".into()), ColumnKind::Int, "n").unwrap_err();
        assert!(err.message.contains("column 'n'"), "{}", err.message);
    }

    #[test]
    fn keys_refuse_null_and_float() {
        assert!(KeyPart::for_column(PluginValue::Null, ColumnKind::Text, "id").is_err());
        assert!(KeyPart::for_column(PluginValue::Float(1.0), ColumnKind::Float, "id").is_err());
    }
}
