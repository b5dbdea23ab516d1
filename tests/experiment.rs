//! `convlab experiment` end to end on a tiny grid: the tables, resuming only the missing cells,
//! and re-running a cell reproducing its numbers.

use crate::common;

use common::*;

fn run(exp: &std::path::Path, out: &std::path::Path) -> String {
    let o = convlab()
        .arg("experiment")
        .arg(exp)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    ok(&o)
}

#[test]
fn grid_runs_tabulates_and_resumes_only_missing_cells() {
    let d = tmp();
    let exp = d.path().join("tiny.toml");
    std::fs::write(
        &exp,
        r#"
name = "tiny"
question = "Max or avg?"
seeds = [0, 1]
set = { epochs = 2, batch_size = 32, "data.limit_train" = 96, "data.limit_val" = 64 }
ensemble = "max"

[[variant]]
name = "max"

[[variant]]
name = "avg, plain"
set = { "model.pool" = "avg" }
"#,
    )
    .unwrap();
    let out = d.path().join("out");
    let first = run(&exp, &out);
    assert!(first.contains("4 cells (4 to run"), "{first}");
    assert!(first.contains("[4/4]"), "{first}");
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("Max or avg?"));
    assert!(md.contains("| max (baseline) |"), "{md}");
    assert!(md.contains("Ensembles of `max`"), "{md}");
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0].starts_with("variant,seeds,val_top1_mean,val_top1_std"));
    assert!(lines[2].starts_with("\"avg, plain\",2,"), "{csv}");
    let cells = std::fs::read_to_string(out.join("cells.csv")).unwrap();
    assert_eq!(cells.lines().count(), 5);
    // Every cell's validation balanced top-1 and macro F1, as fractions.
    let head: Vec<&str> = cells.lines().next().unwrap().split(',').collect();
    for key in ["val_balanced_top1", "val_macro_f1"] {
        let i = head.iter().position(|c| *c == key).unwrap();
        for l in cells.lines().skip(1) {
            // The variant "avg, plain" is quoted: count fields from the end.
            let f: Vec<&str> = l.rsplit(',').collect();
            let v: f64 = f[head.len() - 1 - i].parse().unwrap();
            assert!((0.0..=1.0).contains(&v), "{key} {v} in {l}");
        }
    }
    assert!(md.contains("| val macro F1 % |"), "{md}");

    // Interrupt two cells: one lost its summary (resumes from its last checkpoint), one lost
    // everything (trains again from scratch). The rest are not touched.
    std::fs::remove_file(out.join("cells/max-s1/summary.json")).unwrap();
    std::fs::remove_dir_all(out.join("cells/avg__plain-s0")).unwrap();
    let second = run(&exp, &out);
    assert!(second.contains("4 cells (2 to run"), "{second}");
    assert!(
        second.contains("[3/4]") && second.contains("[4/4]"),
        "{second}"
    );
    // Same seed, same machine, same threads: the retrained cell reproduces its numbers (all
    // but the wall time).
    let seconds = cells
        .lines()
        .next()
        .unwrap()
        .split(',')
        .position(|c| c == "seconds")
        .unwrap();
    let from_end = cells.lines().next().unwrap().split(',').count() - 1 - seconds;
    // Fields counted from the end: the variant "avg, plain" is quoted, with a comma.
    let numbers = |csv: &str| -> Vec<Vec<String>> {
        csv.lines()
            .map(|l| {
                let mut f: Vec<String> = l.rsplit(',').map(String::from).collect();
                f.remove(from_end);
                f
            })
            .collect()
    };
    assert_eq!(
        numbers(&std::fs::read_to_string(out.join("cells.csv")).unwrap()),
        numbers(&cells)
    );

    // A bad override names the variant and the key, before anything trains.
    std::fs::write(
        &exp,
        "[[variant]]\nname = \"x\"\nset = { \"model.pool\" = \"median\" }\n",
    )
    .unwrap();
    let o = convlab()
        .arg("experiment")
        .arg(&exp)
        .arg("--out")
        .arg(d.path().join("bad"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("variant `x`") && err.contains("model.pool"),
        "{err}"
    );
}
