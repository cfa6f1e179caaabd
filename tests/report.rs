//! `temper report` on the tiny pipeline with a seed sweep, checked as HTML and in a real
//! browser: headless Chromium loads the page, a script measures what was drawn (every chart
//! has a visible line or point, the graph has a box per stage and its arrows) and records
//! any error, and a screenshot is taken. Skipped, saying so, only where no Chromium is
//! installed (`scripts/setup.sh` installs Debian's `chromium`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Runs in the page at the end of the body (the layout is done by then): measures the drawn
/// geometry and writes the result into `data-check` on the body, which `--dump-dom` prints.
const CHECK: &str = r#"<script>
(() => {
  const seen = (e) => { const b = e.getBBox(); return b.width > 0 || b.height > 0; };
  const charts = [...document.querySelectorAll('.charts svg')];
  const drawn = charts.filter(svg =>
    [...svg.querySelectorAll('polyline, circle, polygon')].some(seen));
  const boxes = [...document.querySelectorAll('svg.dag g.stage rect')].filter(seen).length;
  const edges = [...document.querySelectorAll('svg.dag path.edge')]
    .filter(e => e.getTotalLength() > 0).length;
  const bands = document.querySelectorAll('polygon.band').length;
  const samples = document.querySelectorAll('details.samples tr').length;
  document.body.setAttribute('data-check', JSON.stringify({
    charts: charts.length, drawn: drawn.length, boxes, edges, bands, samples,
    errors: window.__errors }));
})();
</script>"#;

/// Collects script errors from the first moment, before anything of the report runs.
const ERRORS: &str = r#"<script>window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));</script>"#;

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .flat_map(|name| std::env::split_paths(&path).map(move |d| d.join(name)))
    .find(|p| p.is_file())
}

/// Headless Chromium on `page` with extra arguments; (stdout, stderr). `timeout` guards
/// against a browser that never exits.
fn headless(browser: &Path, page: &Path, args: &[&str]) -> (String, String) {
    let out = Command::new("timeout")
        .arg("120")
        .arg(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium starts");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_report_draws_the_graph_sweeps_samples_and_every_chart() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_reward_sweep(dir.path());
    let f = file.to_str().unwrap();
    let run = Command::new(bin("temper"))
        .args(["run", f])
        .output()
        .unwrap();
    assert_ok(&run, "sweep run");
    let stages = dir.path().join("work/stages");

    // Bad input the report must survive and name: a NaN logged mid-run (null in JSON) and a
    // last line cut off by a kill.
    let pretrain = stages.join("pretrain/metrics.jsonl");
    let mut text = std::fs::read_to_string(&pretrain).unwrap();
    text.push_str("{\"split\":\"train\",\"step\":1000,\"loss\":null}\n{\"split\":\"train\",\"st");
    std::fs::write(&pretrain, text).unwrap();
    let lines = std::fs::read_to_string(&pretrain).unwrap().lines().count();

    let report = Command::new(bin("temper"))
        .args(["report", f])
        .output()
        .unwrap();
    assert_ok(&report, "report");
    let page = dir.path().join("work/report.html");
    let html = std::fs::read_to_string(&page).unwrap();
    for needle in [
        "<svg class=\"dag\"",
        "<g class=\"stage done\"><title>reward@seed=2: up to date",
        "class=\"edge\"",
        "<h3>reward (2 branches)</h3>",
        "class=\"band\"",
        "<details class=\"samples\"><summary>Samples:",
        "Not finite (drawn as gaps): loss at step 1000",
        &format!("skipped unreadable line {lines}"),
    ] {
        assert!(html.contains(needle), "report.html lacks {needle}");
    }
    let metrics = Command::new(bin("temper"))
        .args(["metrics", f, "pretrain"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&metrics.stderr).contains("skipped unreadable line"),
        "temper metrics names the broken line"
    );

    let Some(browser) = chromium() else {
        eprintln!(
            "SKIPPED the browser half: no chromium on PATH (scripts/setup.sh installs Debian's \
             `chromium`; this machine could not)"
        );
        return;
    };
    let checked = dir.path().join("check.html");
    let instrumented = html
        .replacen("<head>", &format!("<head>{ERRORS}"), 1)
        .replacen("</body>", &format!("{CHECK}</body>"), 1);
    std::fs::write(&checked, instrumented).unwrap();
    let (dom, log) = headless(&browser, &checked, &["--dump-dom"]);
    let attr = dom
        .split("data-check=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("the check script did not run:\n{log}"));
    let check: serde_json::Value =
        serde_json::from_str(&attr.replace("&quot;", "\"").replace("&amp;", "&")).unwrap();
    eprintln!("browser check: {check}");
    let n_stages = std::fs::read_dir(&stages).unwrap().count() as u64;
    assert_eq!(check["errors"], serde_json::json!([]), "{log}");
    assert!(check["charts"].as_u64().unwrap() >= 20, "{check}");
    assert_eq!(
        check["drawn"], check["charts"],
        "a chart drew nothing: {check}"
    );
    assert_eq!(check["boxes"].as_u64(), Some(n_stages), "{check}");
    assert!(check["edges"].as_u64().unwrap() >= n_stages - 1, "{check}");
    assert!(check["bands"].as_u64().unwrap() >= 1, "{check}");
    assert!(check["samples"].as_u64().unwrap() >= 2, "{check}");
    if let Some(line) = log.lines().find(|l| l.contains(":CONSOLE")) {
        panic!("the page logged to the console: {line}");
    }

    let shot = dir.path().join("report.png");
    let arg = format!("--screenshot={}", shot.display());
    headless(&browser, &page, &[&arg, "--window-size=1280,2400"]);
    let png = std::fs::read(&shot).expect("a screenshot");
    assert_eq!(&png[1..4], b"PNG");
    assert!(
        png.len() > 20_000,
        "a near-empty screenshot: {} bytes",
        png.len()
    );
}
