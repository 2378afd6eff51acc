// Command-line tests: the binary as a user runs it, on the embedded tiny corpus, CPU only.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_train_gpt");
// A model small enough that a run takes seconds on two cores.
#[rustfmt::skip]
const SMALL: &[&str] = &[
    "--device", "cpu", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "32", "--batch-size", "4",
    "--steps", "20", "--val-every", "10", "--val-tokens", "512", "--warmup-steps", "2", "--lr-adam", "0.1",
    "--sample-tokens", "0",
];

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("train_gpt-cli-{}", std::process::id())).join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

// Shards of the embedded tiny corpus, prepared once for all tests.
fn tiny_shards() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = tmp("tiny-shards").join("tiny");
        let o = run(&["prepare", "data/tiny", "--out", out.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        out
    })
}

// One short training run on the tiny shards, as it ends.
fn train_output(log_dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--data", tiny_shards().to_str().unwrap(), "--log-dir", log_dir.to_str().unwrap()];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    run(&args)
}

// One short training run; returns the log path.
fn train(log_dir: &Path, extra: &[&str]) -> PathBuf {
    let o = train_output(log_dir, extra);
    assert!(o.status.success(), "train failed: {}", text(&o.stderr));
    let out = text(&o.stdout);
    PathBuf::from(out.lines().find_map(|l| l.strip_prefix("log: ")).expect("the run names its log"))
}

fn logs_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default()
}

// A failed command: non-zero exit, one line on stderr that says what to do.
fn assert_one_line_error(o: &Output, code: i32, want: &str) {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(want), "expected {want:?} in: {err}");
}

#[test]
fn a_run_writes_a_self_describing_log() {
    let dir = tmp("describe");
    let log = train(&dir, &[]);
    let s = std::fs::read_to_string(&log).unwrap();
    assert!(s.starts_with("// train_gpt.rs"), "the log opens with the source");
    assert!(s.contains(&"=".repeat(100)) && s.contains("# kernels/ext.cpp"));
    for key in ["rustc: ", "tch: 0.24.0", "libtorch: 2.11.0", "config: {", "data: {", "summary: {"] {
        assert!(s.contains(key), "missing {key}");
    }
    let config = s.lines().find_map(|l| l.strip_prefix("config: ")).unwrap();
    let config: serde_json::Value = serde_json::from_str(config).unwrap();
    assert_eq!(config["steps"], 20);
    assert_eq!(config["lr_muon"], 0.02);
    let data: serde_json::Value =
        serde_json::from_str(s.lines().find_map(|l| l.strip_prefix("data: ")).unwrap()).unwrap();
    assert_eq!(data["sha256"].as_str().unwrap().len(), 64);
    let vals: Vec<f64> = s
        .lines()
        .filter(|l| l.starts_with("step:"))
        .filter_map(|l| l.split("val_loss:").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(vals.len(), 3, "validation at 0, 10 and 20");
    assert!(vals[2] < vals[0] - 0.3, "val loss falls: {vals:?}");
    assert!(s.contains("step:4/20 train_loss:") && s.contains("step_avg:"));
    // every train step line ends with its ETA: steps left × step_avg
    let train_lines: Vec<&str> = s.lines().filter(|l| l.starts_with("step:") && l.contains("train_loss:")).collect();
    assert_eq!(train_lines.len(), 20);
    for l in &train_lines {
        let field = |k: &str| l.split(k).nth(1).unwrap().split(|c: char| c == ' ' || c == 'm').next().unwrap();
        let (step, avg): (f64, f64) =
            (field("step:").split('/').next().unwrap().parse().unwrap(), field("step_avg:").parse().unwrap());
        let eta: f64 = l.rsplit_once(" eta:").expect("eta last").1.strip_suffix('s').unwrap().parse().unwrap();
        assert!((eta - (20.0 - step) * avg / 1e3).abs() <= 0.051, "{l}");
    }
    assert!(train_lines[19].ends_with(" eta:0.0s"));
    assert!(!logs_in(&dir).iter().any(|p| p.to_string_lossy().ends_with(".partial")), "no partial file left");
}

// A log is enough to rebuild its run: `source` gives back the files that built the binary, byte for byte, from the
// plain log or its gzipped copy; the header names the checkout and the command.
#[test]
fn source_of_a_log_is_the_repo_tree() {
    let dir = tmp("source");
    let log = train(&dir, &[]);
    let s = std::fs::read_to_string(&log).unwrap();
    let header = |k: &str| s.lines().find_map(|l| l.strip_prefix(k)).unwrap_or_else(|| panic!("no {k}")).to_string();
    assert!(header("command: ").ends_with(&format!("--log-dir {} {}", dir.display(), SMALL.join(" "))));
    let commit = header("git_commit: ");
    assert!(commit.len() == 40 || commit == "unknown", "{commit}");
    assert!(!header("git_dirty: ").is_empty());
    assert_eq!(header("embedded_files_match_checkout: "), "true");
    let gz = dir.join("copy.txt.gz");
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::best());
    std::io::Write::write_all(&mut enc, s.as_bytes()).unwrap();
    enc.finish().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let want = [
        "train_gpt.rs",
        "tools.rs",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        ".cargo/config.toml",
        "run.sh",
        "kernels/ext.cpp",
        "kernels/tau_attn.cu",
        "kernels/softcap_ce.cu",
        "kernels/block_ops.cu",
        "kernels/tau_bias.cu",
        "kernels/mma_bf16.cuh",
        "kernels/launchers.h",
    ];
    for (i, from) in [&log, &gz].into_iter().enumerate() {
        let out = dir.join(format!("tree{i}"));
        let o = run(&["source", from.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert!(text(&o.stdout).contains("build: cd "), "{}", text(&o.stdout));
        fn walk(d: &Path, base: &Path, got: &mut Vec<String>) {
            for e in std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()) {
                match e.is_dir() {
                    true => walk(&e, base, got),
                    false => got.push(e.strip_prefix(base).unwrap().display().to_string()),
                }
            }
        }
        let mut got = vec![];
        walk(&out, &out, &mut got);
        let (mut got, mut want) = (got, want.map(String::from).to_vec());
        got.sort();
        want.sort();
        assert_eq!(got, want);
        for f in &want {
            assert!(std::fs::read(out.join(f)).unwrap() == std::fs::read(root.join(f)).unwrap(), "{f} differs");
        }
        assert_one_line_error(
            &run(&["source", from.to_str().unwrap(), "--out", out.to_str().unwrap()]),
            1,
            "exists and is not an empty folder",
        );
    }
    let empty = tmp("source-empty");
    assert!(run(&["source", log.to_str().unwrap(), "--out", empty.to_str().unwrap()]).status.success());
    assert_one_line_error(&run(&["source", "Cargo.toml", "--out", tmp("x").join("t").to_str().unwrap()]), 1, "not a");
}

#[test]
fn tau_run_logs_laplacian_tau_and_diagnostics() {
    let dir = tmp("tau");
    let log = train(&dir, &["--attn", "tau-lt", "--laplacian", "corpus", "--lap-k", "512", "--lap-tokens", "200000"]);
    let s = std::fs::read_to_string(&log).unwrap();
    let lap: serde_json::Value =
        serde_json::from_str(s.lines().find_map(|l| l.strip_prefix("laplacian: ")).unwrap()).unwrap();
    assert_eq!(lap["source"], "corpus");
    assert_eq!(lap["connected"], true);
    assert!(lap["lambda2"].as_f64().unwrap() > 0.0 && lap["build_ms"].as_f64().unwrap() > 0.0);
    assert!(s.lines().any(|l| l.starts_with("tau: ")));
    assert_eq!(s.lines().filter(|l| l.starts_with("diag: ")).count(), 3);
    assert!(log.with_extension("laplacian.npy").exists(), "L is saved beside the log");
}

#[test]
fn stats_diff_and_plot_read_logs() {
    let dir = tmp("records");
    let a = train(&dir, &["--seed", "1", "--target-val-loss", "20"]);
    let b = train(&dir, &["--seed", "2", "--target-val-loss", "20"]);
    let o = run(&["stats", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains("runs: 2") && out.contains("p_value: "), "{out}");
    let o = run(&["stats", a.to_str().unwrap(), b.to_str().unwrap(), "--vs", a.to_str().unwrap(), b.to_str().unwrap()]);
    let out = text(&o.stdout);
    assert!(
        o.status.success()
            && out.contains("compare: causal (2 runs) vs causal (2 runs)")
            && out.lines().any(|l| l.starts_with("final_val_loss:") && l.contains("diff 0.0000 welch_t 0.000")),
        "{out}"
    );
    assert!(out.contains("winner: none: a and b are equal in time_to_target_ms"), "{out}");
    // one new run against a record's runs
    let o = run(&["stats", a.to_str().unwrap(), "--vs", a.to_str().unwrap(), b.to_str().unwrap()]);
    let out = text(&o.stdout);
    assert!(
        o.status.success() && out.starts_with("runs: 1") && out.contains("(a's one run against b's spread"),
        "{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("winner: ")), "{out}");
    let o = run(&["diff", a.to_str().unwrap(), b.to_str().unwrap()]);
    let out = text(&o.stdout);
    assert!(o.status.success() && out.contains("seed: 1 -> 2"), "{out}");
    let svg = dir.join("plot.svg");
    let o = run(&["plot", a.to_str().unwrap(), b.to_str().unwrap(), "--out", svg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<svg") && s.contains("causal seed 1") && s.contains("target 20"));
    let o = run(&["plot", a.to_str().unwrap(), "--train", "--out", svg.to_str().unwrap()]);
    assert!(o.status.success() && std::fs::read_to_string(&svg).unwrap().contains("train loss vs step"));
    // curves: a row a step (train lines 1..20, validations at 0, 10, 20), or a JSON object a log
    let o = run(&["curves", a.to_str().unwrap(), b.to_str().unwrap()]);
    let csv = text(&o.stdout);
    assert!(o.status.success() && csv.starts_with("log,record,variant,seed,step,train_loss,val_loss,train_time_ms\n"));
    assert_eq!(csv.lines().count(), 1 + 2 * 21, "{csv}");
    let row = format!("{},,causal,2,10,", b.display());
    let row: Vec<&str> = csv.lines().find(|l| l.starts_with(&row)).unwrap().split(',').collect();
    assert!(row[5].parse::<f64>().is_ok() && row[6].parse::<f64>().is_ok() && row[7].parse::<f64>().is_ok());
    let o = run(&["curves", a.to_str().unwrap(), "--format", "json"]);
    let j: serde_json::Value = serde_json::from_str(&text(&o.stdout)).unwrap();
    assert_eq!((j[0]["seed"].as_i64(), j[0]["points"].as_array().unwrap().len()), (Some(1), 21));
    assert_one_line_error(&run(&["stats", "Cargo.toml"]), 1, "not a train_gpt log");
    // records are committed gzipped: every tool reads `.txt.gz` as the `.txt` it holds
    let gz = dir.join("b.txt.gz");
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::best());
    std::io::Write::write_all(&mut enc, &std::fs::read(&b).unwrap()).unwrap();
    enc.finish().unwrap();
    let (plain, zipped) = (
        run(&["stats", a.to_str().unwrap(), b.to_str().unwrap()]),
        run(&["stats", a.to_str().unwrap(), gz.to_str().unwrap()]),
    );
    assert!(zipped.status.success() && zipped.stdout == plain.stdout, "{}", text(&zipped.stderr));
    let o = run(&["diff", b.to_str().unwrap(), gz.to_str().unwrap()]);
    assert!(o.status.success() && text(&o.stdout).contains("source: identical"), "{}", text(&o.stdout));
    let cut = dir.join("cut.txt.gz");
    std::fs::write(&cut, &std::fs::read(&gz).unwrap()[..100]).unwrap();
    assert_one_line_error(&run(&["stats", a.to_str().unwrap(), cut.to_str().unwrap()]), 1, "not a readable gzip file");
}

#[test]
fn checkpoint_and_reproducible_sample() {
    let dir = tmp("ckpt");
    let ck = dir.join("m.safetensors");
    train(&dir, &["--save-checkpoint", ck.to_str().unwrap()]);
    let sample = || {
        run(&[
            "sample",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--prompt",
            "The",
            "--tokens",
            "12",
            "--seed",
            "3",
            "--device",
            "cpu",
        ])
    };
    let (x, y) = (sample(), sample());
    assert!(x.status.success(), "{}", text(&x.stderr));
    assert_eq!(x.stdout, y.stdout, "same seed, same sample");
    assert!(text(&x.stdout).starts_with("The"));
}

#[test]
fn bad_input_gets_one_line_and_leaves_nothing() {
    let o = run(&["train", "--no-such-option"]);
    assert_one_line_error(&o, 2, "--help");
    assert_one_line_error(&run(&["train", "--nproc", "0"]), 2, "--nproc");
    for bad in ["--n-layer", "--n-head"] {
        assert_one_line_error(&run(&["train", bad, "0", "--device", "cpu"]), 1, "--n-layer and --n-head must be ≥ 1");
    }
    let dir = tmp("bad");
    let d = dir.to_str().unwrap();
    assert_one_line_error(
        &run(&["train", "--data", "/nonexistent/shards", "--log-dir", d, "--device", "cpu"]),
        1,
        "train_gpt prepare",
    );
    // a corrupt shard: right size, wrong magic
    let corrupt = tmp("corrupt");
    for f in ["train_000000.bin", "val_000000.bin"] {
        let mut b = std::fs::read(tiny_shards().join(f)).unwrap();
        b[0] = 0;
        std::fs::write(corrupt.join(f), b).unwrap();
    }
    assert_one_line_error(
        &run(&["train", "--data", corrupt.to_str().unwrap(), "--log-dir", d, "--device", "cpu"]),
        1,
        "magic",
    );
    let mut diverge = vec!["train", "--data", tiny_shards().to_str().unwrap(), "--log-dir", d];
    diverge.extend_from_slice(SMALL);
    diverge.extend_from_slice(&["--lr-adam", "1e30", "--lr-muon", "1e30"]);
    assert_one_line_error(&run(&diverge), 1, "diverged");
    assert_one_line_error(
        &run(&[
            "train",
            "--attn",
            "tau",
            "--laplacian",
            "file:/nope.npy",
            "--data",
            tiny_shards().to_str().unwrap(),
            "--log-dir",
            d,
            "--device",
            "cpu",
        ]),
        1,
        "not found",
    );
    assert!(logs_in(&dir).is_empty(), "failed runs leave no log: {:?}", logs_in(&dir));
    let o = run(&["prepare", "data/tiny", "--out", tiny_shards().to_str().unwrap()]);
    assert_one_line_error(&o, 1, "already holds shards");
    assert_one_line_error(
        &run(&["prepare", "/nonexistent.jsonl.zst", "--out", tmp("p").to_str().unwrap()]),
        1,
        "check the path",
    );
}

#[test]
fn cuda_asked_for_where_none_exists() {
    if run(&["has-cuda"]).status.success() {
        return; // a GPU box: nothing to refuse
    }
    let o = run(&[
        "train",
        "--device",
        "cuda",
        "--data",
        tiny_shards().to_str().unwrap(),
        "--log-dir",
        tmp("nocuda").to_str().unwrap(),
    ]);
    assert_one_line_error(&o, 1, "--device cpu");
}

#[test]
fn fused_kernels_need_cuda_and_no_tau_chunk() {
    let dir = tmp("fused");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--attn",
            "tau",
            "--kernels",
            "fused",
            "--data",
            tiny_shards().to_str().unwrap(),
            "--log-dir",
            dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    assert_one_line_error(&train(&["--tau-chunk", "64"]), 1, "pass one of them");
    assert_one_line_error(&train(&["--device", "cpu"]), 1, "needs CUDA (the device is Cpu); pass --kernels plain");
    assert_one_line_error(
        &run(&["bench", "--device", "cpu", "--variants", "tau", "--kernels", "fused"]),
        1,
        "pass --kernels plain",
    );
    assert!(logs_in(&dir).is_empty());
}

// The repo travels to GPU boxes whole (64 MiB a call): logs under records/ are committed gzipped.
#[test]
fn records_hold_no_uncompressed_log_over_100_kb() {
    fn walk(d: &Path, big: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()) {
            if e.is_dir() {
                walk(&e, big);
            } else if e.metadata().unwrap().len() > 100_000 && !e.to_string_lossy().ends_with(".gz") {
                big.push(e.display().to_string());
            }
        }
    }
    let mut big = vec![];
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("records"), &mut big);
    assert!(big.is_empty(), "uncompressed files over 100 KB under records/ (gzip -9n them): {big:?}");
}

// rustfmt.toml's max_width, held where rustfmt cannot break a line (strings, comments).
#[test]
fn no_rust_source_line_is_over_120_characters() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for f in ["train_gpt.rs", "tools.rs", "build.rs", "tests/cli.rs", "tests/unit/train.rs", "tests/unit/records.rs"] {
        for (i, l) in std::fs::read_to_string(root.join(f)).unwrap().lines().enumerate() {
            assert!(l.chars().count() <= 120, "{f}:{}: {} characters", i + 1, l.chars().count());
        }
    }
}

#[test]
fn readme_records_table_matches_the_logs() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let (begin, end) = (
        "<!-- records-table: generated by `train_gpt records-table --current`, checked by tests/cli.rs -->\n",
        "<!-- records-table end -->",
    );
    let start = readme.find(begin).expect("README has the records table markers") + begin.len();
    let table = &readme[start..start + readme[start..].find(end).expect("end marker")];
    let o = run(&["records-table", "records", "--current"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        table,
        text(&o.stdout),
        "README records table differs from the logs under records/: regenerate it with `train_gpt records-table \
        --current`"
    );
    // the earlier records are the whole table's, past the current ones
    let all = text(&run(&["records-table", "records"]).stdout);
    assert!(all.contains("earlier records") && !table.contains("earlier records"));
    assert!(table.lines().count() >= 2, "at least the header");
}

#[test]
fn bench_reports_each_variant_as_json() {
    let out = tmp("bench").join("bench.json");
    let prof = tmp("bench").join("profile");
    let o = run(&[
        "bench",
        "--device",
        "cpu",
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--bench-steps",
        "2",
        "--bench-warmup",
        "1",
        "--out",
        out.to_str().unwrap(),
        "--profile",
        prof.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    // --profile: one Chrome trace a variant, holding the step's ops, forward (matmuls) and backward (autograd's nodes)
    for v in ["causal", "tau", "tau-lt"] {
        let trace: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(prof.join(format!("{v}_rank0.json"))).unwrap()).unwrap();
        let names: Vec<&str> = trace["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["cat"] == "cpu_op")
            .filter_map(|e| e["name"].as_str())
            .collect();
        assert!(
            names.contains(&"aten::mm") && names.iter().any(|n| n.contains("Backward")),
            "{v}: {} ops",
            names.len()
        );
    }
    assert_eq!(std::fs::read_dir(&prof).unwrap().count(), 3, "only the three traces, no .partial");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let attns: Vec<&str> = rows.iter().map(|r| r["attn"].as_str().unwrap()).collect();
    assert_eq!(attns, ["causal", "tau", "tau-lt"]);
    for r in &rows {
        assert_eq!(
            (r["impl"].as_str(), r["batch"].as_i64(), r["seq"].as_i64(), r["kernels"].as_str()),
            (Some("rust"), Some(2), Some(32), Some("plain"))
        );
        assert!(r["ms_per_step"].as_f64().unwrap() > 0.0 && r["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["forward_backward_ms"].as_f64().unwrap() > 0.0 && r["optimizer_ms"].as_f64().unwrap() > 0.0, "{r}");
        // one process: no all-reduce to speak of, the whole batch on this rank
        assert!(r["all_reduce_ms"].as_f64().unwrap() < r["forward_backward_ms"].as_f64().unwrap(), "{r}");
        assert_eq!((r["world_size"].as_i64(), r["rows_per_rank"].as_i64()), (Some(1), Some(2)));
    }
}

#[test]
fn bench_decode_measures_cache_and_speed_for_both_variants() {
    let dir = tmp("decode");
    let (c, t) = (dir.join("causal.safetensors"), dir.join("tau.safetensors"));
    train(&dir, &["--steps", "2", "--save-checkpoint", c.to_str().unwrap()]);
    train(&dir, &["--steps", "2", "--attn", "tau", "--laplacian", "chain", "--save-checkpoint", t.to_str().unwrap()]);
    let out = dir.join("decode.json");
    let o = run(&[
        "bench-decode",
        "--checkpoint",
        c.to_str().unwrap(),
        t.to_str().unwrap(),
        "--prompt-lens",
        "4,40",
        "--gen-lens",
        "6",
        "--batch-sizes",
        "1,3",
        "--repeats",
        "2",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(rows.len(), 8, "2 checkpoints × 2 batch sizes × 2 prompt lengths");
    for r in &rows {
        assert_eq!(r["cache_bytes"], r["cache_bytes_formula"], "{r}");
        assert!(r["cache_bytes_allocated"].is_null(), "no allocator statistics on the CPU: {r}");
        assert_eq!(r["kernels"], "plain");
        // 40 + 6 tokens run past the trained context of 32 (a longer RoPE table) and say so
        assert_eq!(r["beyond_trained_context"].as_bool(), Some(r["prompt_len"] == 40), "{r}");
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(r["ms_per_token_at_position"].as_array().unwrap().len(), 6, "{r}");
        // 6 steps: every one is a mark
    }
    let bytes = |attn: &str, b: i64| {
        rows.iter().find(|r| r["attn"] == attn && r["batch"] == b && r["prompt_len"] == 4).unwrap()["cache_bytes"]
            .as_i64()
            .unwrap()
    };
    // f32 on CPU, head dim 16: V plus one λ per head is (16·4+4)/(2·16·4) = 53% of K plus V
    assert_eq!(bytes("tau", 3) * 128, bytes("causal", 3) * 68);
    // the fused kernels are CUDA only, for decoding too
    let o = run(&["bench-decode", "--checkpoint", t.to_str().unwrap(), "--device", "cpu", "--kernels", "fused"]);
    assert_one_line_error(&o, 1, "--kernels fused needs CUDA");
}

#[test]
fn launcher_rendezvous_and_a_dead_rank() {
    let o = run(&["dist-check", "--nproc", "3", "--dist-timeout", "20"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("rank 0/3: rendezvous and barrier ok"));
    // rank 1 dies after the rendezvous: the launcher stops the others at once and names it
    let t0 = std::time::Instant::now();
    let o = run(&["dist-check", "--nproc", "3", "--fail-rank", "1", "--dist-timeout", "20"]);
    assert_one_line_error(&o, 1, "rank 1 of 3 failed");
    assert!(t0.elapsed().as_secs_f64() < 15.0, "stopped well inside the timeout: {:?}", t0.elapsed());
    // started by hand (as across hosts) with a rank that never comes: an error after the timeout, not a hang
    let o = Command::new(BIN)
        .args(["dist-check", "--dist-timeout", "2"])
        .env("WORLD_SIZE", "2")
        .env("RANK", "0")
        .env("MASTER_PORT", "29613")
        .output()
        .unwrap();
    assert_one_line_error(&o, 1, "1/2 clients joined");
}

#[test]
fn several_ranks_need_gpus() {
    if run(&["has-cuda"]).status.success() {
        return;
    }
    let dir = tmp("ranks");
    let mut args =
        vec!["train", "--nproc", "2", "--data", tiny_shards().to_str().unwrap(), "--log-dir", dir.to_str().unwrap()];
    args.extend_from_slice(SMALL);
    let out = dir.join("bench.json");
    for o in [run(&args), run(&["bench", "--nproc", "2", "--variants", "causal", "--out", out.to_str().unwrap()])] {
        assert_one_line_error(&o, 1, "needs a CUDA GPU each");
    }
    assert!(logs_in(&dir).is_empty() && !out.exists());
}

// The harness against the team's PyTorch reference (tests/reference/ref_train.py): the same initial weights,
// batches and recipe, fp32 on CPU, six steps at a high learning rate, for each variant. The training losses agree
// to every digit logged, so the models (tau's λ, τ calibration and temperatures too), Muon, Adam and the data
// order are the reference's.
#[test]
fn parity_with_the_pytorch_reference() {
    for (attn, lap) in [("causal", "chain"), ("tau", "chain"), ("tau-lt", "chain")] {
        let dir = tmp(&format!("parity-{attn}"));
        let init = dir.join("init.safetensors");
        let shape = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--seq-len", "32", "--batch-size", "4"];
        let mut common = vec![
            "train",
            "--data",
            tiny_shards().to_str().unwrap(),
            "--log-dir",
            dir.to_str().unwrap(),
            "--device",
            "cpu",
            "--dtype",
            "f32",
            "--warmup-steps",
            "1",
            "--cooldown-frac",
            "0",
            "--val-every",
            "1000",
            "--val-tokens",
            "256",
            "--sample-tokens",
            "0",
            "--attn",
            attn,
            "--laplacian",
            lap,
        ];
        common.extend_from_slice(&shape);
        // lr 0 for one step: the checkpoint holds the initial weights (and L)
        let mut a = common.clone();
        a.extend_from_slice(&[
            "--steps",
            "1",
            "--lr-muon",
            "0",
            "--lr-adam",
            "0",
            "--save-checkpoint",
            init.to_str().unwrap(),
        ]);
        assert!(run(&a).status.success());
        let mut b = common.clone();
        b.extend_from_slice(&["--steps", "6", "--lr-muon", "0.1", "--lr-adam", "0.05"]);
        let o = run(&b);
        assert!(o.status.success(), "{}", text(&o.stderr));
        let ours: Vec<String> = text(&o.stdout)
            .lines()
            .filter(|l| l.contains("train_loss:"))
            .map(|l| l.split(" train_time").next().unwrap().to_string())
            .collect();
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
        let shard = tiny_shards().join("train_000000.bin");
        let o = Command::new(python)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "tests/reference/parity.py",
                init.to_str().unwrap(),
                shard.to_str().unwrap(),
                "2",
                "2",
                "64",
                "32",
                "4",
                "6",
                "0.1",
                "0.05",
                attn,
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o.stderr));
        let theirs: Vec<String> = text(&o.stdout).lines().map(str::to_string).collect();
        assert_eq!(ours.len(), 6);
        assert_eq!(ours, theirs, "{attn}");
    }
}

// ------------------------------------------------------------------------------------------------------------------
// Bad input (issue 20): one line, a non-zero exit, nothing half-written or overwritten

// Issue 20.1: a bad output path costs no run: every one is checked before the first step.
#[test]
fn output_paths_are_checked_before_the_first_step() {
    let dir = tmp("outputs");
    let d = |p: &str| dir.join(p).to_str().unwrap().to_string();
    std::fs::write(dir.join("file"), "x").unwrap();
    let refused = |o: Output, want: &str| {
        assert_one_line_error(&o, 1, want);
        assert!(!text(&o.stdout).contains("step:") && !text(&o.stdout).contains("ms_per_step"), "{}", text(&o.stdout));
    };
    refused(train_output(&dir, &["--save-checkpoint", &d("missing/m.safetensors")]), "missing");
    refused(train_output(&dir, &["--save-checkpoint", dir.to_str().unwrap()]), "a folder");
    refused(train_output(&dir.join("file/logs"), &[]), "--log-dir");
    #[rustfmt::skip]
    let bench = |extra: &[&str]| {
        let mut a = vec!["bench", "--device", "cpu", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
            "--seq-len", "32", "--batch-size", "2", "--bench-steps", "1", "--bench-warmup", "0",
            "--variants", "causal"];
        a.extend_from_slice(extra);
        run(&a)
    };
    refused(bench(&["--out", &d("missing/bench.json")]), "missing");
    refused(bench(&["--profile", &d("file/profile")]), "--profile");
    let ck = dir.join("m.safetensors");
    let log = train(&dir, &["--steps", "2", "--save-checkpoint", ck.to_str().unwrap()]);
    let o =
        run(&["bench-decode", "--checkpoint", ck.to_str().unwrap(), "--device", "cpu", "--out", &d("missing/d.json")]);
    refused(o, "missing");
    assert_one_line_error(&run(&["plot", log.to_str().unwrap(), "--out", &d("missing/p.svg")]), 1, "missing");
    assert_eq!(logs_in(&dir).len(), 3, "one log, one checkpoint, the file: {:?}", logs_in(&dir));
}

// Issue 20.2: --save-checkpoint never replaces a file unless told to.
#[test]
fn save_checkpoint_replaces_a_file_only_with_overwrite() {
    let dir = tmp("overwrite");
    let ck = dir.join("m.safetensors");
    train(&dir, &["--steps", "2", "--save-checkpoint", ck.to_str().unwrap()]);
    let first = std::fs::read(&ck).unwrap();
    let o = train_output(&dir, &["--steps", "2", "--seed", "1", "--save-checkpoint", ck.to_str().unwrap()]);
    assert_one_line_error(&o, 1, "--overwrite");
    assert!(!text(&o.stdout).contains("step:"), "refused before training");
    assert_eq!(std::fs::read(&ck).unwrap(), first, "the file is untouched");
    train(&dir, &["--steps", "2", "--seed", "1", "--save-checkpoint", ck.to_str().unwrap(), "--overwrite"]);
    assert_ne!(std::fs::read(&ck).unwrap(), first, "--overwrite replaces it");
}

// Runs the binary with DIR a tmpfs of 2 MB, `fill` bytes of it taken, in a private mount namespace (unshare), then
// lists DIR: (output, "NAMES steps=N", N the step lines of the .partial left). None where namespaces are not allowed.
fn on_full_tmpfs(dir: &Path, fill: u64, args: &[&str]) -> Option<(Output, String)> {
    let probe = Command::new("unshare").args(["--user", "--map-root-user", "--mount", "true"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: unshare cannot make a mount namespace here");
        return None;
    }
    let script = r#"d=$1; fill=$2; shift 2
        mount -t tmpfs -o size=2m none "$d" || exit 99
        [ "$fill" -gt 0 ] && head -c "$fill" /dev/zero > "$d/fill"
        "$@"; rc=$?
        left=$(ls "$d" | grep -v '^fill$' | tr '\n' ' ')
        echo "after: ${left}steps=$(cat "$d"/*.partial 2>/dev/null | grep -c '^step:')"
        exit $rc"#;
    let mut a = vec!["--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", dir.to_str().unwrap()];
    let fill = fill.to_string();
    a.push(&fill);
    a.push(BIN);
    a.extend_from_slice(args);
    let o = Command::new("unshare").args(&a).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
    assert_ne!(o.status.code(), Some(99), "mount failed: {}", text(&o.stderr));
    let after = text(&o.stdout).lines().find_map(|l| l.strip_prefix("after: ")).unwrap().to_string();
    Some((o, after))
}

// Issue 20.3: a full disk under the log, at its header or mid-run: one line naming the file and the cause, and the
// .partial log kept for reading. A tmpfs of 2 MB in a mount namespace stands for the disk.
#[test]
fn a_full_disk_gets_one_line_and_keeps_the_partial_log() {
    let dir = tmp("full");
    let log = std::fs::read_to_string(train(&dir, &["--steps", "2"])).unwrap();
    let header = log.find("\nstep:").unwrap() as u64; // bytes before the first step line
    let mnt = tmp("full-mnt");
    let mut args = vec!["train", "--data", tiny_shards().to_str().unwrap(), "--log-dir", mnt.to_str().unwrap()];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(&["--steps", "60", "--val-every", "30"]);
    let page = 4096;
    // at the header: 8 KB free; mid-run: the header's pages free, then 60 step lines need more
    for (free, steps) in [(2 * page, false), (header.div_ceil(page) * page, true)] {
        let Some((o, after)) = on_full_tmpfs(&mnt, 2 * 1024 * 1024 - free, &args) else { return };
        assert_one_line_error(&o, 1, "No space left on device");
        assert!(text(&o.stderr).contains(mnt.to_str().unwrap()), "names the path: {}", text(&o.stderr));
        assert!(after.contains(".txt.partial") && !after.contains(".txt "), "the .partial alone is kept: {after}");
        assert_eq!(!after.ends_with("steps=0"), steps, "{after}");
    }
}

// A checkpoint's tensors: (name, dtype, shape, bytes).
type Tensors = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

// A checkpoint rewritten to `dst`: `cfg` edits its config, `edit` its tensors.
fn rewrite_checkpoint(src: &Path, dst: &Path, cfg: &dyn Fn(&mut serde_json::Value), edit: &dyn Fn(&mut Tensors)) {
    use safetensors::tensor::TensorView;
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut c: serde_json::Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["config"]).unwrap();
    cfg(&mut c);
    let mut ts: Tensors =
        st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    edit(&mut ts);
    let views: Vec<(String, TensorView)> =
        ts.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let meta = Some(std::collections::HashMap::from([("config".to_string(), c.to_string())]));
    std::fs::write(dst, safetensors::tensor::serialize(views, &meta).unwrap()).unwrap();
}

// Issue 20.4: checkpoints wrong for the code, and bad sampling options: one line naming the tensor or option.
#[test]
fn sample_and_bench_decode_refuse_checkpoints_wrong_for_the_code() {
    let dir = tmp("wrong-ckpt");
    let ck = dir.join("m.safetensors");
    train(&dir, &["--steps", "2", "--save-checkpoint", ck.to_str().unwrap()]);
    let write = |name: &str, cfg: &dyn Fn(&mut serde_json::Value), edit: &dyn Fn(&mut Tensors)| {
        rewrite_checkpoint(&ck, &dir.join(name), cfg, edit);
        dir.join(name)
    };
    let none = |_: &mut Tensors| {};
    let f16 = |ts: &mut Tensors| {
        let w = ts.iter_mut().find(|t| t.0 == "wte").unwrap();
        w.1 = safetensors::Dtype::F16;
        w.3.truncate(w.3.len() / 2);
    };
    let swap = |ts: &mut Tensors| {
        let i = ts.iter().position(|t| t.0 == "blocks.0.mlp.fc").unwrap();
        let j = ts.iter().position(|t| t.0 == "blocks.0.mlp.proj").unwrap();
        let (a, b) = (ts[i].0.clone(), ts[j].0.clone());
        (ts[i].0, ts[j].0) = (b, a);
    };
    let cases = [
        (write("wide.safetensors", &|c| c["n_embd"] = 64.into(), &none), "wte"),
        (write("seq0.safetensors", &|c| c["seq_len"] = 0.into(), &none), "seq_len"),
        (write("f16.safetensors", &|_| {}, &f16), "wte"),
        (write("swap.safetensors", &|_| {}, &swap), "blocks.0.mlp."),
    ];
    for (p, want) in &cases {
        let p = p.to_str().unwrap();
        assert_one_line_error(&run(&["sample", "--checkpoint", p, "--tokens", "3", "--device", "cpu"]), 1, want);
        #[rustfmt::skip]
        let o = run(&["bench-decode", "--checkpoint", p, "--prompt-lens", "4", "--gen-lens", "2", "--batch-sizes", "1",
            "--repeats", "1", "--device", "cpu"]);
        assert_one_line_error(&o, 1, want);
    }
    let c = ck.to_str().unwrap();
    for (opt, v) in [("--top-k", "0"), ("--top-k", "-3"), ("--temperature", "nan"), ("--tokens", "-1")] {
        let o = run(&["sample", "--checkpoint", c, &format!("{opt}={v}"), "--device", "cpu"]); // = passes -3 as a value
        assert_one_line_error(&o, 1, opt);
    }
}

// Issue 20.5: too few val tokens for one sequence.
#[test]
fn too_few_val_tokens_is_one_line() {
    let dir = tmp("val-tokens");
    assert_one_line_error(&train_output(&dir, &["--val-tokens", "1"]), 1, "too few val tokens");
    assert_one_line_error(&train_output(&dir, &["--val-tokens=-5"]), 1, "--val-tokens");
    assert!(logs_in(&dir).is_empty());
}

// Issue 20.6: a .npy Laplacian whose header is nonsense (negative or huge dims) is refused in one line.
#[test]
fn npy_laplacian_with_a_bad_shape_is_one_line() {
    let dir = tmp("npy-shape");
    for (name, shape, payload) in
        [("neg", "(-4, -4)", 64), ("huge", "(4294967296, 4294967296)", 64), ("one", "(-1,)", 0)]
    {
        let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(header.len() as u16).to_le_bytes());
        b.extend_from_slice(header.as_bytes());
        b.extend(std::iter::repeat_n(0u8, payload));
        let p = dir.join(format!("{name}.npy"));
        std::fs::write(&p, b).unwrap();
        let lap = format!("file:{}", p.display());
        let o = train_output(&dir, &["--attn", "tau", "--laplacian", &lap]);
        assert_one_line_error(&o, 1, "shape");
    }
    assert_eq!(logs_in(&dir).len(), 3, "only the three .npy files");
}

// Issue 20.7: records-table needs a records folder; prepare needs documents and an --out apart from its input.
#[test]
fn records_table_and_prepare_refuse_what_they_cannot_use() {
    assert_one_line_error(&run(&["records-table", "/nonexistent/records"]), 1, "records");
    assert_one_line_error(&run(&["records-table", "Cargo.toml"]), 1, "records");
    let empty_track = tmp("rt-empty").join("linux-c_1xH100");
    std::fs::create_dir_all(&empty_track).unwrap();
    assert_one_line_error(&run(&["records-table", empty_track.parent().unwrap().to_str().unwrap()]), 1, "no track");
    let dir = tmp("prep-bad");
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let out = dir.join("out");
    assert_one_line_error(
        &run(&["prepare", empty.to_str().unwrap(), "--out", out.to_str().unwrap()]),
        1,
        "no documents",
    );
    assert!(!out.exists(), "no output folder");
    let texts = dir.join("texts");
    std::fs::create_dir_all(&texts).unwrap();
    std::fs::write(texts.join("a.txt"), "Some text.\n\nMore text, then the held-out part.\n".repeat(50)).unwrap();
    let t = texts.to_str().unwrap();
    assert_one_line_error(&run(&["prepare", t, "--out", t]), 1, "--out");
    assert_eq!(logs_in(&texts).len(), 1, "nothing written among the inputs");
}

// Issue 20.8: options outside their domain are refused before anything runs.
#[test]
fn nonsense_option_values_are_refused() {
    let dir = tmp("domains");
    for (opt, v) in [
        ("--target-val-loss", "nan"),
        ("--lr-muon", "-0.01"),
        ("--lr-adam", "nan"),
        ("--tau", "0"),
        ("--tau", "-1"),
        ("--muon-momentum", "1.5"),
        ("--adam-eps", "-1"),
    ] {
        let o = train_output(&dir, &["--attn", "tau", "--laplacian", "chain", &format!("{opt}={v}")]);
        assert_one_line_error(&o, 1, opt);
    }
    // what a variant cannot run, refused before any log
    for (args, want) in [
        (["--attn", "sliding", "--window", "0"], "pass --window"),
        (["--attn", "tau-multi", "--bands", "0"], "pass --bands"),
        (["--attn", "tau-multi", "--bands", "1000"], "pass --bands"),
        (["--attn", "tau-full", "--n-kv-head", "1"], "drop --n-kv-head"),
    ] {
        assert_one_line_error(&train_output(&dir, &args), 1, want);
    }
    assert!(logs_in(&dir).is_empty());
}

// No command-line input panics (the readers' property test, hundreds of inputs in-process, is
// file_readers_never_panic_on_mangled_input in tests/unit/train.rs): seeded mangled shards, checkpoints (bytes flipped,
// or a config field out of range), .npy files and logs through the binary itself; a dozen runs, seconds.
#[test]
fn mangled_input_files_never_panic_the_binary() {
    use rand::{Rng, SeedableRng};
    let dir = tmp("fuzz");
    let ck = dir.join("m.safetensors");
    let log = train(&dir, &["--steps", "1", "--save-checkpoint", ck.to_str().unwrap()]);
    let npy = dir.join("l.npy");
    let l: Vec<u8> = (0..16 * 16).flat_map(|i| if i % 17 == 0 { 1f32 } else { 0f32 }.to_le_bytes()).collect();
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (16, 16), }\n";
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(header.len() as u16).to_le_bytes());
    b.extend(header.bytes().chain(l));
    std::fs::write(&npy, b).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let mut flip = |src: &Path, dst: &Path| {
        let mut b = std::fs::read(src).unwrap();
        (0..rng.gen_range(1..6)).for_each(|_| {
            let i = rng.gen_range(0..b.len().min(400));
            b[i] = if rng.gen_bool(0.5) { rng.gen() } else { b"-0123456789,:"[rng.gen_range(0..13)] };
        });
        b.truncate(if rng.gen_bool(0.3) { rng.gen_range(0..b.len()) } else { b.len() });
        std::fs::write(dst, b).unwrap();
    };
    let logs = dir.join("logs");
    let small: Vec<&str> = SMALL.iter().copied().chain(["--steps", "1", "--val-tokens", "64"]).collect();
    let (fields, values) =
        (["n_layer", "n_head", "n_embd", "seq_len", "vocab_size", "n_kv_head"], [-1i64, 0, 3, 1 << 40]);
    for i in 0..12 {
        let case = dir.join(format!("case{i}"));
        std::fs::create_dir_all(&case).unwrap();
        let c = case.to_str().unwrap().to_string();
        let mut args: Vec<String> = match i % 4 {
            0 => {
                for f in ["train_000000.bin", "val_000000.bin"] {
                    flip(&tiny_shards().join(f), &case.join(f));
                }
                vec!["train".into(), "--data".into(), c]
            }
            1 => {
                let dst = case.join("m.safetensors");
                match i {
                    1 => flip(&ck, &dst),
                    _ => rewrite_checkpoint(&ck, &dst, &|c| c[fields[i / 4]] = values[(i / 4 + 1) % 4].into(), &|_| {}),
                }
                vec!["sample".into(), "--checkpoint".into(), dst.display().to_string(), "--tokens".into(), "2".into()]
            }
            2 => {
                flip(&npy, &case.join("l.npy"));
                let lap = format!("file:{}", case.join("l.npy").display());
                let data = tiny_shards().display().to_string();
                ["train", "--data", &data, "--attn", "tau", "--laplacian", &lap].map(String::from).to_vec()
            }
            _ => {
                flip(&log, &case.join("log.txt"));
                vec!["stats".into(), case.join("log.txt").display().to_string(), log.display().to_string()]
            }
        };
        if args[0] == "train" {
            args.extend(["--log-dir", logs.to_str().unwrap()].iter().chain(&small).map(|s| s.to_string()));
        } else if args[0] == "sample" {
            args.extend(["--device".to_string(), "cpu".to_string()]);
        }
        let o = Command::new(BIN).args(&args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
        let err = text(&o.stderr);
        assert!(o.status.code() != Some(101) && !err.contains("panicked"), "case {i}: {args:?}: {err}");
    }
}

// ------------------------------------------------------------------------------------------------------------------
// Outputs that two runs, a full disk or a crash cannot corrupt (issue 21)

// Issue 21.3: a run whose val loss climbs above its step-0 value diverged, finite or not: exit 1, no log to count.
#[test]
fn a_diverged_run_with_finite_loss_fails() {
    let dir = tmp("diverged");
    let o = train_output(&dir, &["--lr-adam", "1e9", "--val-every", "4"]);
    assert_one_line_error(&o, 1, "diverged");
    assert!(logs_in(&dir).is_empty(), "{:?}", logs_in(&dir));
}

// Issue 21.4: a log cut mid-run (a crash) or short of its configured steps is no run: stats and records-table skip it
// and say so.
#[test]
fn cut_logs_are_skipped_and_named() {
    let dir = tmp("cut");
    let a = train(&dir, &["--steps", "4", "--val-every", "2"]);
    let s = std::fs::read_to_string(&a).unwrap();
    let b = dir.join("b.txt");
    std::fs::copy(&a, &b).unwrap();
    let cut = dir.join("cut.txt");
    std::fs::write(&cut, &s[..s.find("step:2/4 val_loss").unwrap()]).unwrap();
    let short = dir.join("short.txt");
    let summary = s.lines().find(|l| l.starts_with("summary: ")).unwrap();
    std::fs::write(&short, s.replace(summary, &summary.replace("\"steps\":4,", "\"steps\":2,"))).unwrap();
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let o = run(&["stats", &p(&a), &p(&b), &p(&cut), &p(&short)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("runs: 2"), "{}", text(&o.stdout));
    let err = text(&o.stderr);
    assert!(
        err.contains(&format!("skipped {}: ", p(&cut))) && err.contains(&format!("skipped {}: ", p(&short))),
        "{err}"
    );
    // a records tree: the record counts its one full run
    let rec = dir.join("records/tiny_1xCPU/2026-01-01_Cut");
    std::fs::create_dir_all(&rec).unwrap();
    std::fs::copy(&a, rec.join("a.txt")).unwrap();
    std::fs::copy(&cut, rec.join("cut.txt")).unwrap();
    let o = run(&["records-table", &p(&dir.join("records"))]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let row = text(&o.stdout).lines().find(|l| l.contains("[Cut]")).unwrap().to_string();
    assert_eq!(row.split(" | ").nth(4), Some("1"), "one run: {row}");
    assert!(text(&o.stderr).contains("cut.txt: "), "{}", text(&o.stderr));
}

// Issue 21.1: two runs saving to one --save-checkpoint path at once: the file holds exactly one run's weights, and
// that run's log says so (its sha256); the other run's weights go beside it, under its own log's word.
#[test]
fn two_runs_saving_one_checkpoint_do_not_mix() {
    use sha2::Digest;
    let dir = tmp("race");
    let ck = dir.join("m.safetensors");
    let spawn = |seed: &str| {
        let mut args = vec!["train", "--data", tiny_shards().to_str().unwrap(), "--log-dir", dir.to_str().unwrap()];
        args.extend_from_slice(SMALL);
        args.extend_from_slice(&["--steps", "4", "--seed", seed, "--save-checkpoint", ck.to_str().unwrap()]);
        Command::new(BIN).args(&args).current_dir(env!("CARGO_MANIFEST_DIR")).output()
    };
    let (x, y) = std::thread::scope(|s| {
        let x = s.spawn(|| spawn("1").unwrap());
        let y = s.spawn(|| spawn("2").unwrap());
        (x.join().unwrap(), y.join().unwrap())
    });
    let mut saved = vec![];
    for o in [&x, &y] {
        assert!(o.status.success(), "{}", text(&o.stderr));
        let line = text(&o.stdout).lines().find_map(|l| l.strip_prefix("checkpoint: ").map(str::to_string)).unwrap();
        let (path, sha) = line.split_once(" sha256:").expect("the log names the checkpoint and its sha256");
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(format!("{:x}", sha2::Sha256::digest(&bytes)), sha, "{path} holds this run's weights");
        saved.push(path.to_string());
    }
    assert!(saved.contains(&ck.to_str().unwrap().to_string()) && saved[0] != saved[1], "{saved:?}");
    assert!(!logs_in(&dir).iter().any(|p| p.to_string_lossy().ends_with(".partial")), "{:?}", logs_in(&dir));
}

// Issue 21.1: two prepare runs into one --out: one is refused, the shards are one corpus.
#[test]
fn two_prepares_into_one_out_one_refused() {
    let out = tmp("prep-race").join("out");
    let spawn = || Command::new(BIN).args(["prepare", "data/tiny", "--out", out.to_str().unwrap()]).output();
    let (x, y) = std::thread::scope(|s| {
        let x = s.spawn(|| spawn().unwrap());
        let y = s.spawn(|| spawn().unwrap());
        (x.join().unwrap(), y.join().unwrap())
    });
    let ok = [&x, &y].iter().filter(|o| o.status.success()).count();
    assert_eq!(ok, 1, "exactly one prepare wins: {} / {}", text(&x.stderr), text(&y.stderr));
    let failed = if x.status.success() { &y } else { &x };
    assert_eq!(text(&failed.stderr).trim_end().lines().count(), 1, "{}", text(&failed.stderr));
    let names: Vec<String> = logs_in(&out).iter().map(|p| p.file_name().unwrap().to_string_lossy().into()).collect();
    assert_eq!(names.len(), 2, "train and val shards only: {names:?}");
}

// Issue 21.2 and 21.5: prepare on a full disk leaves nothing; a corpus without val documents and unknown kinds of
// file are refused; .jsonl.gz is read as JSON Lines.
#[test]
fn prepare_is_whole_or_nothing() {
    let mnt = tmp("prep-full");
    let out = mnt.join("out");
    if let Some((o, after)) =
        on_full_tmpfs(&mnt, 2 * 1024 * 1024 - 64 * 1024, &["prepare", "data/tiny", "--out", out.to_str().unwrap()])
    {
        assert_one_line_error(&o, 1, "No space left on device");
        assert_eq!(after, "steps=0", "nothing left");
    }
    let dir = tmp("prep-kinds");
    let docs = |split: &str| {
        (0..20).map(|i| format!("{{\"path\":\"{i}\",\"split\":\"{split}\",\"text\":\"doc {i} text\"}}\n")).collect()
    };
    let train_only: String = docs("train");
    std::fs::write(dir.join("t.jsonl"), &train_only).unwrap();
    let prep = |input: &str, out: &str| {
        run(&["prepare", dir.join(input).to_str().unwrap(), "--out", dir.join(out).to_str().unwrap()])
    };
    assert_one_line_error(&prep("t.jsonl", "t"), 1, "no val documents");
    std::fs::write(dir.join("c.json"), "[1, 2]").unwrap();
    assert_one_line_error(&prep("c.json", "c"), 1, ".jsonl");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, (train_only + &docs("val")).as_bytes()).unwrap();
    std::fs::write(dir.join("g.jsonl.gz"), gz.finish().unwrap()).unwrap();
    let o = prep("g.jsonl.gz", "g");
    assert!(
        o.status.success() && text(&o.stdout).contains("val: 20 documents"),
        "{}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert!(!dir.join("t").exists() && !dir.join("c").exists(), "refused runs leave no folder");
}

// Issue 21.5: a failed tau run leaves no Laplacian; a checkpoint on a full disk leaves no .partial.
#[test]
fn failed_runs_leave_nothing_behind() {
    let dir = tmp("leftovers");
    let o = train_output(&dir, &["--attn", "tau", "--laplacian", "chain", "--lr-adam", "1e30", "--lr-muon", "1e30"]);
    assert_one_line_error(&o, 1, "diverged");
    assert!(logs_in(&dir).is_empty(), "{:?}", logs_in(&dir));
    let mnt = tmp("ckpt-full");
    let ck = mnt.join("m.safetensors");
    let mut args = vec!["train", "--data", tiny_shards().to_str().unwrap(), "--log-dir", dir.to_str().unwrap()];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(&["--steps", "1", "--save-checkpoint", ck.to_str().unwrap()]);
    if let Some((o, after)) = on_full_tmpfs(&mnt, 0, &args) {
        assert_one_line_error(&o, 1, "No space left on device");
        assert_eq!(after, "steps=0", "no .partial checkpoint");
    }
    assert!(logs_in(&dir).is_empty(), "{:?}", logs_in(&dir));
}

// Issue 21.6: error messages give advice that fits.
#[test]
fn error_messages_fit_their_cause() {
    let dir = tmp("advice");
    let o = train_output(&dir, &["--seq-len", "1"]);
    assert_one_line_error(&o, 1, "--seq-len must be ≥ 2");
    let o = run(&["train", "--data", "/nonexistent/shards", "--log-dir", dir.to_str().unwrap(), "--device", "cpu"]);
    assert_one_line_error(&o, 1, "no such folder");
    // a shard that cannot be read is not a missing one
    let odd = tmp("advice-shards");
    std::fs::create_dir_all(odd.join("train_000000.bin")).unwrap();
    std::fs::copy(tiny_shards().join("val_000000.bin"), odd.join("val_000000.bin")).unwrap();
    let o = run(&["train", "--data", odd.to_str().unwrap(), "--log-dir", dir.to_str().unwrap(), "--device", "cpu"]);
    assert_one_line_error(&o, 1, "train_000000.bin");
    assert!(!text(&o.stderr).contains("prepare"), "{}", text(&o.stderr));
    let o = run(&["prepare", "data/tiny", "--out", "Cargo.toml/shards"]);
    assert_one_line_error(&o, 1, "--out");
    // a tau run that fails before any step is not the learning rates' fault
    let lap = dir.join("nan.npy");
    let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': (16, 16), }}");
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(header.len() as u16).to_le_bytes());
    b.extend(header.bytes().chain((0..256).flat_map(|_| 3e38f32.to_le_bytes()))); // xᵀLx overflows f32
    std::fs::write(&lap, b).unwrap();
    let o = train_output(&dir, &["--attn", "tau", "--laplacian", &format!("file:{}", lap.display())]);
    assert_one_line_error(&o, 1, "check --laplacian");
    assert!(!text(&o.stderr).contains("--lr-"), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("\"warning\":\"BFS says"), "the log says L is no graph Laplacian");
}

// `./run.sh --steps 30` trains, as `./run.sh run --steps 30` does; a word it does not know is still a usage error.
#[test]
fn run_sh_takes_train_options_directly() {
    let sh = |args: &[&str]| {
        Command::new("./run.sh")
            .args(args)
            .env("RUN_SH_DRY_RUN", "1")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap()
    };
    for args in [&["--steps", "30"][..], &["run", "--steps", "30"]] {
        let o = sh(args);
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
        assert_eq!(text(&o.stdout), "train --steps 30\n");
    }
    assert_eq!(text(&sh(&[]).stdout), "train \n");
    let o = sh(&["steps"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).starts_with("usage: ./run.sh [run] [train options]"));
}

// The tiny preset's values are in `train --help`, which otherwise shows the speedrun's defaults.
#[test]
fn train_help_shows_the_tiny_preset() {
    let o = run(&["train", "--help"]);
    assert!(o.status.success());
    let help = text(&o.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    for want in ["The defaults shown below are the speedrun's", "--n-layer 4 --n-head 4 --n-embd 128", "--lap-k 1024"] {
        assert!(help.contains(want), "{want:?} not in: {help}");
    }
}

// The CPU path runs one libtorch thread unless told otherwise and logs what it used; the thread count moves the
// losses by float rounding at most (the tiny preset's 200 steps: one train loss of 200 by 1e-4, in its last digit).
#[test]
fn cpu_threads_are_logged_and_keep_the_numbers() {
    let dir = tmp("threads");
    let losses = |extra: &[&str]| {
        let s = std::fs::read_to_string(train(&dir, extra)).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(s.lines().find_map(|l| l.strip_prefix("config: ")).unwrap()).unwrap();
        let losses: Vec<(String, f64)> = s
            .lines()
            .filter(|l| l.starts_with("step:"))
            .map(|l| {
                let (key, loss) = l.split(" train_time").next().unwrap().split_once("_loss:").unwrap();
                (key.to_string(), loss.parse().unwrap())
            })
            .collect();
        (config["threads"].as_i64(), losses)
    };
    let (one, two) = (losses(&[]), losses(&["--threads", "2"]));
    assert_eq!((one.0, two.0), (Some(1), Some(2)));
    assert_eq!((one.1.len(), two.1.len()), (23, 23));
    for (a, b) in one.1.iter().zip(&two.1) {
        assert!(a.0 == b.0 && (a.1 - b.1).abs() <= 2e-4, "{a:?} {b:?}");
    }
}

// Issue 19: checkpoints that lose no work. The runs below are SMALL with a checkpoint every 5 of its 20 steps.
fn train_args<'a>(log_dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", "--data", tiny_shards().to_str().unwrap(), "--log-dir", log_dir];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    args
}

// The run never interrupted, with every checkpoint kept: (its log, its checkpoint folder).
fn uninterrupted() -> &'static (PathBuf, PathBuf) {
    static RUN: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    RUN.get_or_init(|| {
        let ck = tmp("resume-whole").join("ck");
        let extra = ["--checkpoint-every", "5", "--checkpoint-dir", ck.to_str().unwrap(), "--keep-checkpoints", "9"];
        let log = train(&tmp("resume-whole"), &extra);
        (log, ck)
    })
}

// A log's step lines past `after` without their times (step, then the train or val loss), and its summary.
fn losses_after(log: &Path, after: i64) -> (Vec<String>, serde_json::Value) {
    let s = std::fs::read_to_string(log).unwrap();
    let step = |l: &str| l.strip_prefix("step:")?.split('/').next()?.parse::<i64>().ok();
    let lines = s
        .lines()
        .filter(|l| step(l).is_some_and(|k| k > after))
        .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .collect();
    let summary = s.lines().find_map(|l| l.strip_prefix("summary: ")).expect("a summary");
    (lines, serde_json::from_str(summary).unwrap())
}

// A training run started in the background, its stdout read line by line.
fn spawn_train(
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::Child, std::io::Lines<std::io::BufReader<std::process::ChildStdout>>) {
    let mut c = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = std::io::BufRead::lines(std::io::BufReader::new(c.stdout.take().unwrap()));
    (c, out)
}

fn signal(c: &std::process::Child, sig: i32) {
    assert_eq!(unsafe { libc::kill(c.id() as i32, sig) }, 0);
}

// Resumes from `ck` into fresh folders; returns the new log.
fn resume(ck: &Path, name: &str) -> PathBuf {
    let (logs, cks) = (tmp(name).join("logs"), tmp(name).join("ck"));
    let o = run(&[
        "train",
        "--resume",
        ck.to_str().unwrap(),
        "--log-dir",
        logs.to_str().unwrap(),
        "--checkpoint-dir",
        cks.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "resume failed: {}", text(&o.stderr));
    PathBuf::from(text(&o.stdout).lines().find_map(|l| l.strip_prefix("log: ")).expect("the run names its log"))
}

// SIGINT at a step: the run ends at the step boundary with a checkpoint and a log whose summary says interrupted (a
// .txt, not a .partial), exit 130; resumed, it gives the uninterrupted run's step lines and final loss, every digit.
#[test]
fn an_interrupted_run_resumes_to_the_same_losses() {
    let (whole, _) = uninterrupted();
    let dir = tmp("resume-int");
    let ck = dir.join("ck");
    let args =
        train_args(dir.to_str().unwrap(), &["--checkpoint-every", "5", "--checkpoint-dir", ck.to_str().unwrap()]);
    let (mut c, mut out) = spawn_train(&args, &[]);
    for l in out.by_ref() {
        if l.unwrap().starts_with("step:7/") {
            signal(&c, libc::SIGINT);
            break;
        }
    }
    let rest: Vec<String> = out.map(|l| l.unwrap()).collect();
    let st = c.wait().unwrap();
    assert_eq!(st.code(), Some(130), "{rest:?}");
    let log = PathBuf::from(rest.iter().find_map(|l| l.strip_prefix("log: ")).expect("the log is named"));
    let (_, summary) = losses_after(&log, 0);
    assert_eq!(summary["status"], "interrupted");
    let k = summary["steps"].as_i64().unwrap();
    assert!((7..20).contains(&k), "stopped at a step boundary after step 7, before the end: {k}");
    assert!(ck.join(format!("step_{k:06}")).join("state.json").exists(), "a checkpoint at the stop");
    assert!(rest
        .iter()
        .any(|l| l.starts_with(&format!("checkpoint_state: {}", ck.join(format!("step_{k:06}")).display()))));
    let resumed = resume(&ck, "resume-int-2");
    let s = std::fs::read_to_string(&resumed).unwrap();
    let from = s.lines().find_map(|l| l.strip_prefix("resume: ")).expect("the log records the resume");
    let from: serde_json::Value = serde_json::from_str(from).unwrap();
    assert_eq!(from["step"], k);
    assert_eq!(from["run"].as_str(), log.file_stem().unwrap().to_str(), "the run is the first log's");
    let (want, want_sum) = losses_after(whole, k);
    let (got, got_sum) = losses_after(&resumed, k);
    assert_eq!(got, want);
    let vals_after = [10, 20].iter().filter(|&&v| v > k).count() as i64;
    assert_eq!(got.len() as i64, 20 - k + vals_after, "every step and validation after {k}");
    assert_eq!(got_sum["final_val_loss"], want_sum["final_val_loss"]);
    assert_eq!((got_sum["status"].as_str(), got_sum["resumed_from_step"].as_i64()), (Some("completed"), Some(k)));
    // the interrupted log is left out of stats, the resumed one counts
    let o = run(&["stats", log.to_str().unwrap(), resumed.to_str().unwrap()]);
    assert!(o.status.success() && text(&o.stderr).contains("interrupted at step"), "{}", text(&o.stderr));
}

// A SIGKILL between a checkpoint's files and its rename leaves the earlier checkpoints whole: the run resumes from the
// newest one, to the uninterrupted run's losses. A second SIGTERM exits at once (143), the first waits for a step.
#[test]
fn a_kill_during_a_checkpoint_write_keeps_the_previous_one() {
    let (whole, _) = uninterrupted();
    let dir = tmp("resume-kill");
    let ck = dir.join("ck");
    let args =
        train_args(dir.to_str().unwrap(), &["--checkpoint-every", "5", "--checkpoint-dir", ck.to_str().unwrap()]);
    let stall = |c: &mut std::process::Child| {
        let mut err = std::io::BufRead::lines(std::io::BufReader::new(c.stderr.take().unwrap()));
        assert!(err.any(|l| l.unwrap().starts_with("stalled before the rename of")), "the write stalls");
    };
    let (mut c, _out) = spawn_train(&args, &[("TRAIN_GPT_TEST_STALL_CHECKPOINT", "10")]);
    stall(&mut c);
    signal(&c, libc::SIGKILL);
    c.wait().unwrap();
    let names: Vec<String> = logs_in(&ck).iter().map(|p| p.file_name().unwrap().to_string_lossy().into()).collect();
    assert!(names.contains(&"step_000005".into()) && !names.contains(&"step_000010".into()), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("step_000010.") && n.ends_with(".partial")), "{names:?}");
    let resumed = resume(&ck, "resume-kill-2");
    assert_eq!(losses_after(&resumed, 5).0, losses_after(whole, 5).0);
    // the second signal
    let dir = tmp("resume-term");
    let ck = dir.join("ck");
    let args =
        train_args(dir.to_str().unwrap(), &["--checkpoint-every", "5", "--checkpoint-dir", ck.to_str().unwrap()]);
    let (mut c, _out) = spawn_train(&args, &[("TRAIN_GPT_TEST_STALL_CHECKPOINT", "5")]);
    stall(&mut c);
    signal(&c, libc::SIGTERM);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(c.try_wait().unwrap().is_none(), "the first signal waits for the step boundary");
    let t = std::time::Instant::now();
    signal(&c, libc::SIGTERM);
    assert_eq!(c.wait().unwrap().code(), Some(143));
    assert!(t.elapsed().as_secs() < 5, "the second signal exits at once");
    assert!(checkpoint_names(&ck).is_empty(), "no checkpoint half-written: {:?}", logs_in(&ck));
}

fn checkpoint_names(ck: &Path) -> Vec<String> {
    let names = logs_in(ck).into_iter().map(|p| p.file_name().unwrap().to_string_lossy().to_string());
    names.filter(|n| n.starts_with("step_") && !n.ends_with(".partial")).collect()
}

// A checkpoint that is truncated, corrupt, or of another model is refused in one line naming what differs; nothing
// is written (no log, no checkpoint) and the checkpoint stays as it was.
#[test]
fn a_bad_or_mismatched_checkpoint_is_refused() {
    let (_, ck) = uninterrupted();
    let dir = tmp("resume-bad");
    let logs = dir.join("logs");
    let copy = |name: &str| {
        let to = dir.join(name);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
            std::fs::copy(ck.join("step_000010").join(f), to.join(f)).unwrap();
        }
        to
    };
    let resume_with = |from: &Path, extra: &[&str]| {
        let mut args = vec!["train", "--resume", from.to_str().unwrap(), "--log-dir", logs.to_str().unwrap()];
        args.extend_from_slice(extra);
        run(&args)
    };
    let cut = copy("cut");
    let bytes = std::fs::read(cut.join("model.safetensors")).unwrap();
    std::fs::write(cut.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    assert_one_line_error(&resume_with(&cut, &[]), 1, "model.safetensors does not match its sha256");
    let flipped = copy("flipped");
    let mut bytes = std::fs::read(flipped.join("optimizer.safetensors")).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 1;
    std::fs::write(flipped.join("optimizer.safetensors"), &bytes).unwrap();
    assert_one_line_error(&resume_with(&flipped, &[]), 1, "optimizer.safetensors does not match its sha256");
    let state = copy("state");
    let bytes = std::fs::read(state.join("state.json")).unwrap();
    std::fs::write(state.join("state.json"), &bytes[..bytes.len() - 10]).unwrap();
    assert_one_line_error(&resume_with(&state, &[]), 1, "state.json is not a train_gpt checkpoint 1");
    assert_one_line_error(&resume_with(&dir.join("none"), &[]), 1, "no checkpoint there");
    let good = copy("good");
    for (opt, v, want) in [
        ("--attn", "tau", r#"--attn is "causal" in the checkpoint but "tau" here"#),
        ("--n-embd", "64", "--n-embd is 32 in the checkpoint but 64 here"),
        ("--vocab-size", "50432", "--vocab-size is 50304 in the checkpoint but 50432 here"),
        ("--lr-muon", "0.03", "--lr-muon is 0.02 in the checkpoint but 0.03 here"),
        ("--steps", "5", "the checkpoint is at step 10; pass --steps ≥ 10"),
    ] {
        assert_one_line_error(&resume_with(&good, &[opt, v]), 1, want);
    }
    // a checkpoint folder holds one run: a new run may not write into another's
    assert_one_line_error(
        &train_output(&logs, &["--checkpoint-every", "5", "--checkpoint-dir", ck.to_str().unwrap()]),
        1,
        "holds another run's checkpoint",
    );
    assert!(logs_in(&logs).is_empty(), "no log written: {:?}", logs_in(&logs));
    assert_eq!(checkpoint_names(ck).len(), 4, "the uninterrupted run's checkpoints stay");
    for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        assert_eq!(std::fs::read(good.join(f)).unwrap(), std::fs::read(ck.join("step_000010").join(f)).unwrap());
    }
}

// A race of two variants × two seeds: four runs, interleaved, then the report and the plot. The same command again
// finds the four logs and runs nothing; another config in the same folder runs anew.
#[test]
fn race_runs_interleaved_seeds_and_resumes() {
    let out = tmp("race").join("r");
    let race = |extra: &[&str]| {
        let mut args = vec!["race", "causal", "tau", "--out", out.to_str().unwrap(), "--data"];
        args.extend([tiny_shards().to_str().unwrap(), "--laplacian", "chain"]);
        args.extend_from_slice(SMALL);
        args.extend_from_slice(extra);
        let o = run(&args);
        assert!(o.status.success(), "race failed: {}", text(&o.stderr));
        text(&o.stdout)
    };
    let logs = || logs_in(&out).into_iter().filter(|p| p.extension().is_some_and(|x| x == "txt")).count();
    let first = race(&["--seeds", "2"]);
    let order: Vec<&str> = first.lines().filter(|l| l.starts_with("run ")).collect();
    for (i, want) in ["causal seed 0", "tau seed 0", "causal seed 1", "tau seed 1"].iter().enumerate() {
        assert!(order[i].starts_with(&format!("run {}/4: {want}: train --attn=", i + 1)), "{first}");
    }
    assert_eq!(logs(), 4 + 1, "four logs and race.txt");
    let report = std::fs::read_to_string(out.join("race.txt")).unwrap();
    assert!(first.contains(&report), "the report is printed");
    assert!(report.contains("\ncausal: runs 2 time_to_target_s ") && report.contains("\ntau: runs 2 "), "{report}");
    assert!(report.contains("compare: tau/chain (2 runs) vs causal (2 runs)\n"), "{report}");
    assert!(report.contains("\nfinal_val_loss: 10.") && report.contains("\ntrain_time_ms: "), "{report}");
    assert!(report.contains(" welch_t ") && report.contains("\nrace_winner: "), "{report}");
    let svg = std::fs::read_to_string(out.join("race.svg")).unwrap();
    for line in ["causal (2 runs, min–max)", "tau/chain (2 runs, min–max)"] {
        assert!(svg.contains(line), "no {line} in the plot");
    }
    let again = race(&["--seeds", "2"]);
    assert_eq!(again.matches(": done already (").count(), 4, "{again}");
    assert!(!again.contains(": train --attn"), "{again}");
    assert_eq!((logs(), std::fs::read_to_string(out.join("race.txt")).unwrap()), (4 + 1, report));
    let other = race(&["--seeds", "1", "--lr-adam", "0.05"]);
    assert_eq!(other.matches(": train --attn").count(), 2, "{other}");
    assert_eq!(
        other.matches("ran it with other options (lr_adam: 0.1 -> 0.05); running it anew").count(),
        2,
        "{other}"
    );
    assert!(other.contains("tau vs causal: no test: one run a side (race --seeds 2 or more)"), "{other}");
    assert_eq!(logs(), 6 + 1);
}

#[test]
fn race_refuses_unknown_variants_and_options_it_sets() {
    let out = tmp("race-bad").join("r");
    let o = out.to_str().unwrap();
    let refused = [
        (vec!["causal", "nope"], "race: no variant \"nope\"; pass --attn values: causal, sliding, tau, tau-lt"),
        (vec!["causal", "tau", "--attn", "tau"], "race: --attn is not a race option"),
        (vec!["causal", "tau", "--seed", "3"], "--seeds N runs seeds 0..N"),
        (vec!["causal", "tau", "--log-dir", "x"], "--out DIR sets it"),
        (vec!["tau", "tau"], "race: tau is named twice"),
    ];
    for (args, want) in refused {
        let out = run(&[&["race", "--out", o, "--device", "cpu"][..], &args].concat());
        assert_one_line_error(&out, 1, want);
    }
    assert!(!out.exists(), "nothing written");
    // train's own checks, before any run
    let bad = run(&["race", "causal", "tau", "--out", o, "--device", "cpu", "--steps", "0"]);
    assert_one_line_error(&bad, 1, "race: causal: --steps must be > 0");
    assert!(!out.exists(), "no run, no folder");
}

// A CPU run reruns to the same digits; a log whose embedded train_gpt.rs is not this build's is refused unless
// --allow-source-diff; options the log lacks take today's defaults, and keys this build does not know are refused.
#[test]
fn reproduce_gives_the_same_curve_and_checks_the_source() {
    let dir = tmp("reproduce");
    let log = train(&dir.join("orig"), &[]);
    let out = dir.join("again");
    let o = run(&["reproduce", log.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "reproduce failed: {}", text(&o.stderr));
    let report = std::fs::read_to_string(out.join("reproduce.txt")).unwrap();
    assert!(text(&o.stdout).contains(&report));
    for want in [
        "(seeds [0])\nsource: train_gpt.rs as this build's (sha256 ",
        "absent_options: none\nconfig: as logged\n",
        "final_val_loss_test: none: one run a side\n",
        "val_loss_max_gap: 0.0000 at step 0 (3 matched steps",
        "verdict: same curve within noise",
    ] {
        assert!(report.contains(want), "no {want:?} in {report}");
    }
    // every step's loss to the printed digit: the lines up to their clock
    let losses = |p: &Path| -> Vec<String> {
        let s = std::fs::read_to_string(p).unwrap();
        let steps = s.lines().filter(|l| l.starts_with("step:")).map(|l| l.split(" train_time:").next().unwrap());
        let fin = s.lines().find_map(|l| l.strip_prefix("summary: ")).unwrap().split(',').find(|f| f.contains("final"));
        steps.map(String::from).chain(fin.map(String::from)).collect()
    };
    let new = logs_in(&out)
        .into_iter()
        .find(|p| p.extension().is_some_and(|x| x == "txt") && p != &out.join("reproduce.txt"));
    let (a, b) = (losses(&log), losses(&new.unwrap()));
    assert_eq!(a.len(), 3 + 20 + 1);
    assert!(a.last().unwrap().contains("\"final_val_loss\":10."), "{a:?}");
    assert_eq!(a, b);

    let s = std::fs::read_to_string(&log).unwrap();
    let edited = dir.join("edited.txt");
    std::fs::write(&edited, s.replacen("// train_gpt.rs: the speedrun.", "// train_gpt.rs: a speedrun.", 1)).unwrap();
    let refused = dir.join("refused");
    let o = run(&["reproduce", edited.to_str().unwrap(), "--out", refused.to_str().unwrap()]);
    assert_one_line_error(&o, 1, "or pass --allow-source-diff");
    assert_eq!(text(&o.stderr).matches("(sha256 ").count(), 2, "both hashes");
    assert!(!refused.exists(), "nothing written");
    // accepted with the flag, into the same folder: the run there has this config, so it is not run again
    let o = run(&["reproduce", edited.to_str().unwrap(), "--out", out.to_str().unwrap(), "--allow-source-diff"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let report = text(&o.stdout);
    assert!(report.contains("run 1/1: causal seed 0: done already (") && report.contains("source: DIFFERS"));
    assert!(report.contains("verdict: same curve within noise"), "{report}");

    // a log from before --threads: today's default, named; a key this build does not know: refused
    let old = dir.join("old.txt");
    std::fs::write(&old, s.replacen("\"threads\":1,", "", 1)).unwrap();
    let o = run(&["reproduce", old.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let report = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(report.contains("absent_options: threads (not in the logged config: this build's defaults)"), "{report}");
    assert!(report.contains("config: differs from the logged one: threads: - -> 1"), "{report}");
    let unknown = dir.join("unknown.txt");
    std::fs::write(&unknown, s.replacen("\"threads\":1,", "\"threads\":1,\"warp_drive\":9,", 1)).unwrap();
    let o = run(&["reproduce", unknown.to_str().unwrap(), "--out", refused.to_str().unwrap()]);
    assert_one_line_error(&o, 1, "its config holds \"warp_drive\", not an option of this build");
}
