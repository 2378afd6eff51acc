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

// One short training run; returns the log path.
fn train(log_dir: &Path, extra: &[&str]) -> PathBuf {
    let mut args = vec!["train", "--data", tiny_shards().to_str().unwrap(), "--log-dir", log_dir.to_str().unwrap()];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    let o = run(&args);
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
        "<!-- records-table: generated by `train_gpt records-table`, checked by tests/cli.rs -->\n",
        "<!-- records-table end -->",
    );
    let start = readme.find(begin).expect("README has the records table markers") + begin.len();
    let table = &readme[start..start + readme[start..].find(end).expect("end marker")];
    let o = run(&["records-table", "records"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        table,
        text(&o.stdout),
        "README records table differs from the logs under records/: regenerate it with `train_gpt records-table`"
    );
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
