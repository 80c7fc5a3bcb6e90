//! Enums stored as text in the host's tables: one list of variants and their stored names gives
//! `as_str`, `Display` and `TryFrom<String>` (for `#[sqlx(try_from = "String")]`), so a name
//! cannot be spelled one way when written and another when read.

/// `stored_enum! { #[derive(...)] pub enum Phase("replica_sets.phase") { Running => "running", ... } }`
macro_rules! stored_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident($column:literal) {
            $($(#[$variant_meta:meta])* $variant:ident => $text:literal),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $($(#[$variant_meta])* $variant),+
        }

        impl $name {
            /// The stored name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;

            fn try_from(stored: String) -> Result<$name, String> {
                match stored.as_str() {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!(
                        "{} is '{stored}', which this host does not know (expected one of: {})",
                        $column,
                        [$($text),+].join(", ")
                    )),
                }
            }
        }
    };
}

pub(crate) use stored_enum;

#[cfg(test)]
mod tests {
    stored_enum! {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Colour("paint.colour") {
            Red => "red",
            DarkBlue => "dark-blue",
        }
    }

    #[test]
    fn a_stored_name_reads_back_as_its_variant() {
        for colour in [Colour::Red, Colour::DarkBlue] {
            assert_eq!(Colour::try_from(colour.as_str().to_string()), Ok(colour));
        }
        assert_eq!(Colour::DarkBlue.to_string(), "dark-blue");
        assert_eq!(format!("{:<6}|", Colour::Red), "red   |");
    }

    #[test]
    fn an_unknown_name_is_refused_naming_the_column_and_the_known_names() {
        let error = Colour::try_from("green".to_string()).expect_err("green is not stored");
        assert_eq!(
            error,
            "paint.colour is 'green', which this host does not know (expected one of: red, dark-blue)"
        );
    }
}
