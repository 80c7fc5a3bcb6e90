use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, HttpHost, TestDb, ADMIN_TOKEN};

fn chromium() -> PathBuf {
    let candidates = [
        std::env::var("CHROMIUM").unwrap_or_default(),
        "/usr/bin/chromium".into(),
        "/usr/bin/chromium-browser".into(),
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("headless Chromium is needed for the status page test: apt-get install chromium (scripts/test installs it)")
}

/// Runs headless Chromium on `url`; returns the rendered DOM and writes a screenshot.
fn render(url: &str, screenshot: &std::path::Path) -> String {
    let profile = tempdir("chromium-profile");
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1280,1400",
        "--virtual-time-budget=5000",
    ];
    let profile_arg = format!("--user-data-dir={}", profile.display());
    let dom = Command::new(chromium())
        .args(common)
        .arg(&profile_arg)
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap();
    assert!(
        dom.status.success(),
        "chromium --dump-dom failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let shot = Command::new(chromium())
        .args(common)
        .arg(&profile_arg)
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(url)
        .output()
        .unwrap();
    assert!(
        shot.status.success(),
        "chromium --screenshot failed: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    String::from_utf8_lossy(&dom.stdout).into_owned()
}

fn tempdir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ph-{label}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Counts pixels of one colour (± a little for anti-aliasing) and pixels that are not white.
fn pixels(png_path: &std::path::Path, rgb: [u8; 3]) -> (usize, usize) {
    let decoder = png::Decoder::new(std::fs::File::open(png_path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let (mut matching, mut inked) = (0, 0);
    for px in buf[..info.buffer_size()].chunks(channels) {
        if px[..3].iter().zip(rgb).all(|(a, b)| a.abs_diff(b) <= 8) {
            matching += 1;
        }
        if px[..3].iter().any(|c| *c < 200) {
            inked += 1;
        }
    }
    (matching, inked)
}

/// The status page, rendered by a real browser, shows the projections, the partitions with
/// their owner, and the recent errors of this host.
#[tokio::test]
async fn the_status_page_renders_real_data_in_chromium() {
    let db = TestDb::new("page").await;
    db.append_w1(0, 999, 20).await;
    let poison = db.append("Faults", "f1", "Reject", json!({})).await;
    let h = HttpHost::run(
        "page",
        &db.url,
        &[
            "--plugin",
            test_artifacts::BANK_BALANCES,
            "--plugin",
            test_artifacts::GUEST_FAULTY,
            "--worker-id",
            "status-page-worker",
        ],
    );
    eventually("/ready", Duration::from_secs(30), || async {
        h.get("/ready").await.filter(|(s, _)| *s == 200)
    })
    .await;
    h.host
        .wait_for_log("rejected on purpose", Duration::from_secs(30))
        .await;
    // The partition halts (stop policy), and the host has sampled a few seconds of history.
    eventually(
        "a halt and a few samples",
        Duration::from_secs(60),
        || async {
            let status: serde_json::Value = reqwest::Client::new()
                .get(format!("{}/admin/status", h.health))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let halted = status["projections"]
                .as_array()?
                .iter()
                .any(|p| p["halts"].as_array().is_some_and(|h| !h.is_empty()));
            // Three samples that hold the projection: two rates between them.
            let sampled = status["history"]
                .as_array()?
                .iter()
                .filter(|h| h["projections"]["bank_balances"].is_object())
                .count();
            (halted && sampled >= 3).then_some(())
        },
    )
    .await;
    let partition = projection_host::ids::PartitionId::of("f1", 32).as_i32();

    let dir = tempdir("status-page");
    let screenshot = dir.join("status.png");
    let dom = render(
        &format!("{}/status#token={ADMIN_TOKEN}", h.health),
        &screenshot,
    );
    for expected in [
        "bank_balances",
        "faulty",
        "status-page-worker",
        "p31",
        "rejected on purpose",
        "generation",
    ] {
        assert!(
            dom.contains(expected),
            "the rendered page lacks '{expected}':\n{dom}"
        );
    }
    assert!(
        dom.contains("<div id=\"error\"></div>"),
        "the page reported an error:\n{dom}"
    );
    // The halted partition, with its position and error.
    let halts = &dom[dom.find("id=\"halts\"").expect("a halts table")..];
    let row = &halts[..halts.find("</tbody>").unwrap()];
    assert!(
        row.contains(&format!(
            "<td>p{partition}</td><td class=\"num\">{poison}</td>"
        )) && row.contains("rejected on purpose"),
        "the halted partition is listed with its position and error:\n{row}"
    );
    assert!(dom.contains("1 partition(s) halted"), "{dom}");
    // The charts: one line per projection, drawn from several samples.
    for series in ["throughput:bank_balances", "lag:faulty"] {
        let at = dom
            .find(&format!("data-series=\"{series}\""))
            .unwrap_or_else(|| panic!("no {series} line:\n{dom}"));
        let points = &dom[at..];
        let points = &points[points.find("points=\"").unwrap() + 8..];
        let points = &points[..points.find('"').unwrap()];
        assert!(
            points.split(' ').count() >= 2,
            "{series} is drawn from at least two samples: {points}"
        );
    }
    // The screenshot shows the partition grid in the owner's colour (the first palette entry,
    // #2563eb) and a page full of content, not a blank or error page.
    let (owner_colour, inked) = pixels(&screenshot, [0x25, 0x63, 0xeb]);
    assert!(
        owner_colour > 32 * 20,
        "partition cells in the owner's colour: {owner_colour} pixels"
    );
    assert!(inked > 20_000, "the page has content: {inked} dark pixels");

    // Without the token the page says why instead of showing data.
    let dom = render(&format!("{}/status", h.health), &dir.join("denied.png"));
    assert!(
        dom.contains("<div id=\"error\">status unavailable: unauthorized"),
        "{dom}"
    );
    if let Ok(keep) = std::env::var("KEEP_SCREENSHOT") {
        std::fs::copy(&screenshot, keep).ok();
    }
    std::fs::remove_dir_all(&dir).ok();
    db.drop_db().await;
}
