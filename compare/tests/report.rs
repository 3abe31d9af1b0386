//! The report: `report.json` parses back, every SVG chart is well-formed XML, and the HTML
//! page links only files that exist.

use compare::designs::{design1, design1_msm_cap, design2};
use compare::eval::{Plan, evaluate};
use compare::harness::AnyDesign;
use compare::report::{Report, terminal, write_all};

#[test]
fn report_files_are_well_formed() {
    let mut plan = Plan::smoke(3);
    plan.params.scale = 0.01;
    plan.single_binds = false;
    plan.big_depths = vec![1, 2, 4];
    plan.tiny_depths = vec![1, 8];
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/traces/smmu-dma.trace"
    ))
    .unwrap();
    plan.traces
        .push(compare::trace::parse(&text, "smmu-dma").unwrap());
    let (d1, d2, d3) = (design1(), design2(), design1_msm_cap());
    let designs: [&dyn AnyDesign; 2] = [&d1, &d2];
    let mut events = 0;
    let r = evaluate(&plan, &designs, &[&d3], &mut |n| events += n).expect("runs");
    assert!(events > 0);
    assert_eq!(r.workloads.len(), 7);
    assert!(!r.conclusion.is_empty());

    let dir = std::env::temp_dir().join(format!("compare-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let files = write_all(&r, &dir).expect("writes");

    // report.json parses, as JSON and back into the report.
    let json = std::fs::read_to_string(dir.join("report.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    assert_eq!(v["version"], 1);
    assert_eq!(v["workloads"].as_array().map(Vec::len), Some(7));
    let back: Report = serde_json::from_str(&json).expect("parses back");
    assert_eq!(back.designs, ["Design 1", "Design 2"]);
    assert_eq!(back.sweeps[0].series.len(), 3);

    // Every SVG is well-formed XML with an <svg> root.
    let svgs: Vec<_> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "svg"))
        .collect();
    assert_eq!(svgs.len(), 2 + 2 * 7);
    for p in &svgs {
        let text = std::fs::read_to_string(p).unwrap();
        let doc =
            roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(
            doc.root_element().tag_name().name(),
            "svg",
            "{}",
            p.display()
        );
        assert!(
            doc.descendants()
                .any(|n| n.has_tag_name("polyline") || n.has_tag_name("path")),
            "{} draws something",
            p.display()
        );
    }

    // index.html links exactly the charts written.
    let html = std::fs::read_to_string(dir.join("index.html")).unwrap();
    for p in &svgs {
        let name = p.file_name().unwrap().to_string_lossy();
        assert!(html.contains(&format!("src=\"{name}\"")), "{name} linked");
    }
    let t = terminal(&r);
    assert!(t.contains("peak memory (tables + unconsumed)"));
    assert!(t.contains("Conclusion"));
    let _ = std::fs::remove_dir_all(&dir);
}
