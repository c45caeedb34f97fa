//! `effnet info` numbers against `../shared/reference/ground_truth.csv` (torchvision 0.29 / timm 1.0.31):
//! every row, parameters exactly and MACs exactly at each listed resolution.

mod common;

use effnet::analysis::analyze;
use effnet::spec::variant;

#[test]
fn every_ground_truth_row_matches() {
    let csv = std::fs::read_to_string(common::shared().join("reference/ground_truth.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (model, params, trainable) = (col("model"), col("params"), col("trainable_params"));
    let checks = [
        (col("default_res"), col("macs_default")),
        (col("test_res"), col("macs_test_res")),
    ];
    let macs_224 = col("macs_224");
    let blocks = col("blocks_per_stage");
    let mut rows = 0;
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        let name = f[model];
        let spec = variant(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let repeats: Vec<String> = spec.stage_repeats().iter().map(|r| r.to_string()).collect();
        assert_eq!(repeats.join("-"), f[blocks], "{name} blocks per stage");
        let a = analyze(&spec, 224).unwrap();
        assert_eq!(a.params.to_string(), f[params], "{name} params");
        assert_eq!(
            a.params.to_string(),
            f[trainable],
            "{name} trainable params"
        );
        assert_eq!(a.macs.to_string(), f[macs_224], "{name} MACs at 224");
        for (res_col, macs_col) in checks {
            let res: usize = f[res_col].parse().unwrap();
            assert_eq!(
                analyze(&spec, res).unwrap().macs.to_string(),
                f[macs_col],
                "{name} MACs at {res}"
            );
        }
        rows += 1;
    }
    assert_eq!(rows, 47, "every row of ground_truth.csv is checked");
}
