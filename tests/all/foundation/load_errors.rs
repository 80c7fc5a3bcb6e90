use std::time::Duration;

use crate::support::{Host, TestDb};

async fn refused(db: &TestDb, plugin: &str) -> String {
    let mut host = Host::run("refused", &db.url, &["--once", "--plugin", plugin]);
    let status = host.wait(Duration::from_secs(60)).await;
    assert!(
        !status.success(),
        "a bad plugin must stop the start:\n{}",
        host.log()
    );
    host.log()
}

#[tokio::test]
async fn files_that_are_not_projection_components_are_refused_with_the_reason() {
    let db = TestDb::new("load").await;
    let dir = std::env::temp_dir().join(format!("ph-load-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();

    let garbage = dir.join("garbage.wasm");
    std::fs::write(&garbage, b"this is not webassembly at all").unwrap();
    let log = refused(&db, garbage.to_str().unwrap()).await;
    assert!(log.contains("is not a WebAssembly file"), "{log}");

    // The smallest valid core module: a module, not a component.
    let core = dir.join("core.wasm");
    std::fs::write(&core, [0, b'a', b's', b'm', 1, 0, 0, 0]).unwrap();
    let log = refused(&db, core.to_str().unwrap()).await;
    assert!(
        log.contains("core WebAssembly module, not a component"),
        "{log}"
    );

    // A truncated component.
    let bytes = std::fs::read(test_artifacts::BANK_BALANCES).unwrap();
    let truncated = dir.join("truncated.wasm");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let log = refused(&db, truncated.to_str().unwrap()).await;
    assert!(log.contains("is not a valid component"), "{log}");

    // A component built against another version of the contract.
    let log = refused(&db, test_artifacts::GUEST_WRONG_INTERFACE).await;
    assert!(
        log.contains("was built for pupsourcing:projection@0.2.0"),
        "{log}"
    );
    assert!(
        log.contains("this host implements pupsourcing:projection@0.1.0"),
        "{log}"
    );

    // A missing file.
    let log = refused(&db, dir.join("missing.wasm").to_str().unwrap()).await;
    assert!(log.contains("is not a file"), "{log}");

    // Nothing was projected by any of them.
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pg_namespace WHERE nspname = 'bank_balances'")
            .await,
        0
    );
    std::fs::remove_dir_all(&dir).unwrap();
    db.drop_db().await;
}
