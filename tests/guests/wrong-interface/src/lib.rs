//! A component built against pupsourcing:projection@0.2.0, which this host does not implement.

wit_bindgen::generate!({ world: "projection", path: "wit" });

struct Future;

impl exports::pupsourcing::projection::handler::Guest for Future {
    fn describe_v2() -> String {
        "from the future".into()
    }
}

export!(Future);
