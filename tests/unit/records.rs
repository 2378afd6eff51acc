// Unit tests of tools.rs (records tooling).
use super::*;
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("records-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn write(name: &str, text: &str) -> PathBuf {
    let p = tmp(name);
    std::fs::write(&p, text).unwrap();
    p
}

// The 40-dash rule is put in at run time: a literal one in this file would end the embedded source early.
static SRC: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| SRC_TEMPLATE.replace("<RULE>", &"-".repeat(40)));
const SRC_TEMPLATE: &str = r##"use std::fmt;

/// lr schedule
fn lr(step: usize) -> f64 {
    let s = format!("{{ not a brace {}", step);
    0.02 * (1.0 - step as f64 / 1200.0)
}

trait Opt {
    fn update(&mut self, g: &[f32; 4]);
}

fn muon_step(w: &mut [f32], g: &[f32]) {
    let c = '}';
    for (a, b) in w.iter_mut().zip(g) {
        *a -= 0.02 * b;
    }
}

struct Cfg {
    steps: usize,
}

fn main() {
    let k = r#"kernel { "#;
    println!("{}", lr(0));
}
<RULE>
# kernels/foo.cu
__global__ void foo(float* x) { x[0] = 1.0f; }"##;

fn log_text(src: &str, cfg: &str, vals: &[(u64, f64, f64)], summary: Option<&str>, header: bool) -> String {
    let eq = "=".repeat(100);
    let mut s = format!("{src}\n{eq}\n");
    if header {
        s +=
            "rustc: rustc 1.95.0 (59807616e 2026-04-14)\ntch: 0.24.0\nlibtorch: 2.11.0\ncuda: 13.0\ngpu: NVIDIA H200\n\
              nvidia-smi:\n+------------------------------------------------------------------------------+\n\
              | NVIDIA-SMI 580.65.06              Driver Version: 580.65.06      CUDA Version: 13.0     |\n\
              |   0  NVIDIA H200                    On  |   00000000:19:00.0 Off |                    0 |\n";
        s += &format!("{eq}\n");
    }
    s += &format!("config: {cfg}\n");
    if header {
        s += "data: {\"train_tokens\":91322169,\"val_tokens\":890787,\"shards\":[\"a.bin\"],\"sha256\":\"ab\"}\n";
        s += "laplacian: {\"source\":\"chain\",\"nnz\":190}\ntau: 1.234\n";
    }
    for &(step, t, v) in vals {
        s += &format!("step:{step}/1200 train_time:{t}ms step_avg:130.00ms\n");
        s += &format!("step:{step}/1200 val_loss:{v} train_time:{t}ms step_avg:130.00ms\n");
        s += "diag: {\"step\":100,\"lambda_p05\":[0.1]}\n";
    }
    if let Some(sm) = summary {
        s += "peak memory allocated: 30220 MiB reserved: 38672 MiB\n";
        s += &format!("summary: {sm}\n");
    }
    s
}

const CFG: &str =
    r#"{"variant":"causal","attn":"causal","steps":1200,"lr_muon":0.02,"target_val_loss":2.0,"seed":0,"new_key":[1]}"#;
const VALS: &[(u64, f64, f64)] =
    &[(0, 0.0, 10.8253), (100, 13000.0, 4.5476), (1100, 143000.0, 1.999), (1200, 156000.0, 1.9824)];
const SUMMARY: &str = concat!(
    r#"{"variant":"causal","track":"linux-c_1xH200","steps":1200,"final_val_loss":1.9824,"target_val_loss":2.0,"#,
    r#""time_to_target_ms":150000.0,"#,
    r#""train_time_ms":156000.0,"ms_per_step":130.0,"#,
    r#""tokens_per_s":504000.0,"mfu":0.2,"peak_alloc_mib":30220,"world_size":1,"#,
    r#""laplacian_build_ms":null,"extra":{"x":1}}"#
);

#[test]
fn parses_full_log_with_crlf() {
    let text = log_text(&SRC, CFG, VALS, Some(SUMMARY), true).replace('\n', "\r\n");
    let l = parse_log(&write("full.txt", &text)).unwrap();
    assert_eq!(l.source, *SRC);
    assert_eq!(l.config["lr_muon"], json!(0.02));
    assert_eq!(l.data.as_ref().unwrap()["train_tokens"], json!(91322169));
    assert_eq!(l.val.len(), 4);
    assert_eq!(l.val[1], (100, 13000.0, 4.5476));
    assert_eq!(l.step_avg_ms, Some(130.0));
    assert_eq!(l.peak_alloc_mib, Some(30220.0));
    let v: Vec<(&str, &str)> = l.versions.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
        v,
        [
            ("rustc", "rustc 1.95.0 (59807616e 2026-04-14)"),
            ("tch", "0.24.0"),
            ("libtorch", "2.11.0"),
            ("cuda", "13.0"),
            ("gpu", "NVIDIA H200"),
            ("driver", "580.65.06")
        ]
    );
    assert_eq!(l.variant(), "causal");
    assert_eq!(l.final_val_loss(), Some(1.9824));
    assert_eq!(l.time_to_target_ms(), Some(150000.0)); // from the summary, not the 143000 val line
    assert_eq!(l.train_time_ms(), Some(156000.0));
    assert_eq!(l.target(), Some(2.0));
}

#[test]
fn parses_truncated_log_and_derives_from_step_lines() {
    let cfg = r#"{"attn":"tau","target_val_loss":1.999}"#; // reached exactly at step 1100
    let text = log_text("fn main() {}", cfg, &VALS[..3], None, false) + "step:1101/1200 train_ti"; // crashed mid-line
    let l = parse_log(&write("trunc.txt", &text)).unwrap();
    assert!(l.summary.is_none() && l.data.is_none() && l.versions.is_empty());
    assert_eq!(l.variant(), "tau");
    assert_eq!(l.val.len(), 3);
    assert_eq!(l.final_val_loss(), Some(1.999));
    assert_eq!(l.time_to_target_ms(), Some(143000.0));
    assert_eq!(l.train_time_ms(), Some(143000.0));
    assert_eq!(l.peak_alloc_mib, None);
    // summary says null: target not reached, even though nothing else is known
    let l =
        parse_log(&write("null.txt", &log_text("", "{}", &[], Some(r#"{"time_to_target_ms":null}"#), false))).unwrap();
    assert_eq!((l.time_to_target_ms(), l.variant().as_str(), l.target()), (None, "unknown", None));
}

#[test]
fn rejects_non_log() {
    let p = write("notes.txt", "hello\n");
    assert_eq!(
        parse_log(&p).err().unwrap(),
        format!("{}: not a train_gpt log (no '=' separator line); pass a file from logs/", p.display())
    );
}

fn run(name: &str, loss: f64, ttt: Option<f64>) -> RunLog {
    let ttt = ttt.map_or("null".into(), |t| t.to_string());
    let sm = format!(
        concat!(
            r#"{{"variant":"causal","final_val_loss":{loss},"target_val_loss":3.28,"#,
            r#""time_to_target_ms":{ttt},"train_time_ms":1000.0}}"#
        ),
        loss = loss,
        ttt = ttt
    );
    parse_log(&write(name, &log_text("", "{}", &[], Some(&sm), false))).unwrap()
}

#[test]
fn welch_without_spread() {
    assert_eq!(welch(&[5.0, 5.0], &[5.0, 5.0, 5.0]).unwrap(), (0.0, 3.0, 1.0));
    assert_eq!(welch(&[4.0, 4.0], &[5.0, 5.0]).unwrap(), (f64::NEG_INFINITY, 2.0, 0.0));
}

#[test]
fn welch_matches_scipy() {
    // scipy 1.17.1: stats.ttest_ind(a, b, equal_var=False) -> statistic, pvalue, df
    let cases: [(&[f64], &[f64], f64, f64, f64); 2] = [
        (
            &[2.0163, 2.0078, 1.9766],
            &[3.3666, 3.3777, 3.3452],
            -88.60267806607668,
            1.9451275655668673e-07,
            3.7971790007406008,
        ),
        (
            &[3.279, 3.2785, 3.2778, 3.2792, 3.2781],
            &[3.2801, 3.2810, 3.2795, 3.2806],
            -4.262326969235371,
            0.00486629538893782,
            6.233818191506601,
        ),
    ];
    for (a, b, t, p, df) in cases {
        let (t1, df1, p1) = welch(a, b).unwrap();
        assert!(
            (t1 - t).abs() < 1e-9 * t.abs() && (df1 - df).abs() < 1e-9 * df && (p1 - p).abs() < 1e-6 * p,
            "{t1} {df1} {p1}"
        );
    }
    assert!(welch(&[1.0], &[1.0, 2.0]).is_err());
}

#[test]
fn t_test_matches_scipy() {
    // Expected values from scipy 1.17.1:
    //   scipy.stats.ttest_1samp([3.279, 3.2785, 3.2778, 3.2792, 3.2781], 3.28, alternative='less')
    //   -> statistic=-5.618003173209976, pvalue=0.0024672206297135144; numpy std(ddof=1)=0.0005890670590008984
    let losses = [3.279, 3.2785, 3.2778, 3.2792, 3.2781];
    let logs: Vec<RunLog> =
        losses.iter().enumerate().map(|(i, &x)| run(&format!("r{i}.txt"), x, Some(900.0 + i as f64))).collect();
    let s = stats(&logs).unwrap();
    assert_eq!((s.n, s.time_kind, s.target), (5, "time_to_target_ms", 3.28));
    assert!((s.loss_mean - 3.27852).abs() < 1e-12);
    assert!((s.loss_std - 0.0005890670590008984).abs() < 1e-12);
    assert!((s.t - -5.618003173209976).abs() < 1e-9, "t={}", s.t);
    assert!((s.p_value - 0.0024672206297135144).abs() < 1e-9, "p={}", s.p_value);
    assert_eq!((s.time_mean, s.time_std), (902.0, 2.5f64.sqrt()));
    let r = stats_report(&s);
    assert!(r.contains("t: -5.6180\np_value: 0.0025\n") && r.contains("time_to_target_ms_mean: 902.0"), "{r}");
    let j: Value = serde_json::from_str(r.lines().last().unwrap().strip_prefix("stats: ").unwrap()).unwrap();
    assert_eq!(j["n"], json!(5));
    // one run missed the target: times fall back to train_time_ms
    let mut logs = logs;
    logs.push(run("miss.txt", 3.29, None));
    assert_eq!(stats(&logs).unwrap().time_kind, "train_time_ms");
}

#[test]
fn stats_errors() {
    let a = run("e1.txt", 3.27, Some(1.0));
    assert!(stats(std::slice::from_ref(&a)).unwrap_err().contains("at least 2"));
    let mut b = run("e2.txt", 3.27, Some(1.0));
    b.summary.as_mut().unwrap()["variant"] = json!("tau");
    assert_eq!(stats(&[a, b]).err().unwrap(), "stats: mixed variants (causal, tau); pass logs of one variant");
    let (a, mut b) = (run("e3.txt", 3.27, Some(1.0)), run("e4.txt", 3.27, Some(1.0)));
    b.summary.as_mut().unwrap()["target_val_loss"] = json!(3.3);
    assert!(stats(&[a, b]).unwrap_err().contains("mixed targets (3.28, 3.3)"));
}

#[test]
fn fn_owners_track_bodies() {
    let o = fn_owners(&SRC);
    let at = |needle: &str| o[SRC.lines().position(|l| l.contains(needle)).unwrap()].as_deref();
    assert_eq!(at("not a brace"), Some("lr"));
    assert_eq!(at("0.02 * (1.0"), Some("lr"));
    assert_eq!(at("steps: usize"), None); // struct between functions
    assert_eq!(at("fn update"), Some("update"));
    assert_eq!(at("trait Opt"), None);
    assert_eq!(at("*a -= 0.02"), Some("muon_step")); // after a '}' char literal
    assert_eq!(at("println!"), Some("main")); // after a raw string with a brace
    assert_eq!(at("__global__"), Some("kernels/foo.cu"));
}

#[test]
fn diff_names_key_and_function() {
    // 3 lines become 1, so old and new line numbers disagree after the change
    let loop_a = "for (a, b) in w.iter_mut().zip(g) {\n        *a -= 0.02 * b;\n    }";
    let src_b = SRC.replace(loop_a, "w.iter_mut().zip(g).for_each(|(a, b)| *a -= 0.03 * b);");
    assert_ne!(src_b, *SRC);
    let a = parse_log(&write("da.txt", &log_text(&SRC, CFG, VALS, Some(SUMMARY), true))).unwrap();
    let b =
        parse_log(&write("db.txt", &log_text(&src_b, &CFG.replace("0.02", "0.03"), &VALS[..2], None, false))).unwrap();
    let r = diff_report(&a, &b);
    assert!(r.contains("config: 1 key(s) differ\n  lr_muon: 0.02 -> 0.03\n"), "{r}");
    assert!(r.contains("source: +1 -3 lines; functions touched: muon_step\n"), "{r}");
    assert!(r.contains("     100    4.5476    4.5476   +0.0000\n") && !r.contains("    1200 "), "{r}");
    assert!(r.contains("ms_per_step              130.00       130.00    1.000\n"), "{r}");
    assert!(r.contains("tokens_per_s          504000.00            -        -\n"), "{r}");
    // a key present on one side only
    let mut c = parse_log(&write("dc.txt", &log_text(&SRC, CFG, VALS, None, false))).unwrap();
    c.config.remove("seed");
    assert!(diff_report(&a, &c).contains("  seed: 0 -> -\n"));
    assert!(diff_report(&a, &c).contains("source: identical\n"));
}

#[test]
fn plot_writes_svg_atomically() {
    let a = parse_log(&write("pa.txt", &log_text(&SRC, CFG, VALS, Some(SUMMARY), true))).unwrap();
    let mut b =
        parse_log(&write("pb.txt", &log_text(&SRC, &CFG.replace("causal", "tau"), &VALS[..3], None, false))).unwrap();
    b.val.iter_mut().for_each(|v| v.2 += 0.1);
    let out = tmp("plot.svg");
    plot_svg(&[a, b], &out, false, RunLog::record).unwrap();
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{}", &svg[..50]);
    assert!(svg.trim_end().ends_with("</svg>"));
    let texts: Vec<&str> = svg.lines().map(str::trim).collect(); // plotters puts <text> content on its own line
    for t in
        ["causal seed 0", "tau seed 0", "target 2", "val loss vs step", "training time (s)", "val loss", "2.5", "10"]
    {
        assert!(texts.contains(&t), "no text {t:?}");
    }
    // each log: one curve per panel + one legend swatch per panel, in its own colour
    for RGBColor(r, g, b) in &COLORS[..2] {
        let stroke = format!("stroke=\"#{r:02X}{g:02X}{b:02X}\"");
        assert_eq!(svg.lines().filter(|l| l.starts_with("<polyline") && l.contains(&stroke)).count(), 4, "{stroke}");
    }
    let [a, b] = [out.parent().unwrap().join("no-such-dir/plot.svg"), tmp("empty.svg")];
    assert!(plot_svg(&[], &b, false, RunLog::record).is_err()); // nothing to plot
    let c = parse_log(&write("pc.txt", &log_text(&SRC, CFG, VALS, None, false))).unwrap();
    assert!(plot_svg(&[c], &a, false, RunLog::record).is_err());
    assert!(!a.exists() && !b.exists() && !a.parent().unwrap().exists());
    let left: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(left.is_empty());
}

#[test]
fn embedded_files_split_at_rule_and_header_only() {
    // a `# ` comment inside an embedded file (run.sh, Cargo.toml) is text, not a file header
    let src = format!("{}\n{}\n# run.sh\n#!/bin/sh\n# a comment\necho hi", *SRC, "-".repeat(40));
    let files = embedded_files(&src);
    let names: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
    assert_eq!(names, ["train_gpt.rs", "kernels/foo.cu", "run.sh"]);
    assert!(files[0].1.starts_with("use std::fmt;\n") && files[0].1.ends_with("    println!(\"{}\", lr(0));\n}\n"));
    assert_eq!(files[1].1, "__global__ void foo(float* x) { x[0] = 1.0f; }\n");
    assert_eq!(files[2].1, "#!/bin/sh\n# a comment\necho hi\n");
    // an older harness's tests held a rule and a header in a raw string: the Rust file is put back together
    let old = format!(
        "fn t() {{\n    let s = r#\"\n{r}\n# kernels/foo.cu\nx\"#;\n}}\n{r}\n# kernels/ext.cpp\nint x;",
        r = "-".repeat(40)
    );
    let files = embedded_files(&old);
    assert_eq!(files.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(), ["train_gpt.rs", "kernels/ext.cpp"]);
    assert_eq!(files[0].1, old[..old.rfind(&"-".repeat(40)).unwrap()]);
    let owners = fn_owners(&src);
    assert_eq!(owners.last().unwrap().as_deref(), Some("run.sh"));
    // a path that would leave --out is refused, and nothing is written
    let evil = format!("fn main() {{}}\n{}\n# ../escape.rs\nx\n{}\n", "-".repeat(40), "=".repeat(100));
    let out = tmp("evil-tree");
    let e = cmd_source(&write("evil.txt", &evil), &out).unwrap_err();
    assert!(e.contains("leaves the tree") && !out.exists() && !tmp("escape.rs").exists(), "{e}");
}

#[test]
fn one_run_against_a_set_is_a_z_score() {
    // mpmath 1.3 (the venv's): z = (x − mean)/sd, t = (x − mean)/(sd·√(1 + 1/n)), p = I_{df/(df+t²)}(df/2, 1/2)
    let set = [3.279, 3.2785, 3.2778, 3.2792, 3.2781];
    let (z, df, p) = one_vs_set(3.2801, &set).unwrap();
    assert!((z - 2.68220735798728).abs() < 1e-9 && df == 4.0 && (p - 0.070558465420326827).abs() < 1e-9, "{z} {p}");
    assert_eq!(one_vs_set(5.0, &[5.0, 5.0]).unwrap(), (0.0, 1.0, 1.0));
    assert!(one_vs_set(5.0, &[5.0]).is_err());
    let set: Vec<RunLog> =
        set.iter().enumerate().map(|(i, &x)| run(&format!("s{i}.txt"), x, Some(900.0 + i as f64))).collect();
    let one = [run("one.txt", 3.2801, Some(880.0))];
    let r = compare_report(&one, &set).unwrap();
    assert!(r.contains("final_val_loss: 3.2801 vs 3.2785 diff 0.0016 z 2.682 (a's one run against b's spread"), "{r}");
    assert!(r.contains("time_to_target_ms: 880.0000 vs 902.0000 diff -22.0000 z -13.914"), "{r}");
    assert!(r.contains("winner: a (causal) by time_to_target_ms 880.0000 vs 902.0000, p_two_sided "), "{r}");
    // the one run on the other side: the same z, seen from b
    let r = compare_report(&set, &one).unwrap();
    assert!(r.contains("z -2.682 (b's one run against a's spread") && r.contains("winner: b (causal)"), "{r}");
    assert!(compare_report(&one, &one).unwrap_err().contains("2 or more runs on one side"));
}

#[test]
fn runs_that_missed_the_target_are_named() {
    let a: Vec<RunLog> = (0..3).map(|i| run(&format!("m{i}.txt"), 3.27 + 0.001 * i as f64, Some(900.0))).collect();
    let mut b: Vec<RunLog> = (0..2).map(|i| run(&format!("n{i}.txt"), 3.275 + 0.001 * i as f64, Some(800.0))).collect();
    b.push(run("nmiss.txt", 3.3, None));
    let r = stats_report(&stats(&b).unwrap());
    assert!(r.contains("reached_target: 2/3\ntime: not time-to-target (runs missed the target)"), "{r}");
    assert!(r.contains(&format!("missed the target: {}\n", b[2].path)) && r.contains("train_time_ms_mean"), "{r}");
    let r = compare_report(&a, &b).unwrap();
    assert!(r.contains("time_to_target_ms: not compared: a reached the target in 3/3 runs, b in 2/3"), "{r}");
    assert!(r.contains(&format!("missed the target: {} (final val loss 3.3000)", b[2].path)), "{r}");
    assert!(r.contains("winner: a (causal): every run reached the target, b (causal) missed it in 1 run(s)"), "{r}");
    let j: Value = serde_json::from_str(r.lines().last().unwrap().strip_prefix("compare_json: ").unwrap()).unwrap();
    assert_eq!(j["winner"], json!("a"));
    let r = single_report(&b[2]).unwrap();
    assert!(r.contains("final_val_loss: 3.3000\ntime_to_target_ms: none: missed the target by 0.0200"), "{r}");
    assert!(single_report(&a[0]).unwrap().contains("time_to_target_ms: 900.0\n"));
}

// Step lines as the harness writes them now: train loss and an ETA.
fn with_train_lines(text: &str, seed: i64, shift: f64) -> String {
    let mut lines = String::new();
    for s in [1u64, 50, 100, 1200] {
        let loss = 11.0 - (s as f64).ln() + shift;
        lines += &format!(
            "step:{s}/1200 train_loss:{loss:.4} train_time:{}ms step_avg:130.00ms eta:{:.1}s\n",
            s * 131,
            (1200 - s) as f64 * 0.13
        );
    }
    text.replace("\"seed\":0", &format!("\"seed\":{seed}")).replacen("diag: ", &format!("{lines}diag: "), 1)
}

#[test]
fn step_lines_with_eta_give_train_curves() {
    let l = parse_log(&write("eta.txt", &with_train_lines(&log_text(&SRC, CFG, VALS, Some(SUMMARY), true), 3, 0.0)))
        .unwrap();
    assert_eq!(l.train.len(), 4);
    assert_eq!(l.train[1], (50, 6550.0, 7.0880));
    assert_eq!((l.val.len(), l.step_avg_ms, l.seed()), (4, Some(130.0), Some(3)));
    let csv = curves(std::slice::from_ref(&l), false);
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "log,record,variant,seed,step,train_loss,val_loss,train_time_ms");
    assert_eq!(rows[1], format!("{},,causal,3,0,,10.8253,0", l.path));
    assert_eq!(rows[3], format!("{},,causal,3,50,7.088,,6550", l.path));
    assert_eq!(rows[4], format!("{},,causal,3,100,6.3948,4.5476,13000", l.path)); // val's time: exact
    assert_eq!(rows.len(), 1 + 6);
    let j: Value = serde_json::from_str(&curves(&[l], true)).unwrap();
    assert_eq!(j[0]["seed"], json!(3));
    assert_eq!(
        j[0]["points"][3],
        json!({"step": 100, "train_loss": 6.3948, "val_loss": 4.5476, "train_time_ms": 13000.0})
    );
}

#[test]
fn plot_groups_a_record_folder_into_a_band() {
    let rec = tmp("2026-01-02_Fast");
    std::fs::create_dir_all(&rec).unwrap();
    let log = |name: &str, seed: i64, shift: f64| {
        let mut text = with_train_lines(&log_text(&SRC, CFG, VALS, Some(SUMMARY), true), seed, shift);
        text = text.replace("val_loss:1.9824", &format!("val_loss:{}", 1.9824 + shift));
        let p = rec.join(name);
        std::fs::write(&p, text).unwrap();
        parse_log(&p).unwrap()
    };
    let (a, b) = (log("r1.txt", 1, 0.0), log("r2.txt", 2, 0.05));
    assert_eq!(a.record().as_deref(), Some("2026-01-02_Fast"));
    let other =
        parse_log(&write("solo.txt", &with_train_lines(&log_text(&SRC, CFG, VALS, None, false), 7, 0.1))).unwrap();
    assert_eq!(other.record(), None);
    let lines = plot_lines(&[a.clone(), b.clone(), other.clone()], false, RunLog::record);
    let labels: Vec<&str> = lines.iter().map(|l| l.label.as_str()).collect();
    assert_eq!(labels, ["2026-01-02_Fast (2 runs, min–max)", "causal seed 7"]);
    let (t, step, mean, lo, hi) = *lines[0].pts.last().unwrap();
    assert_eq!((t, step, lo), (156.0, 1200.0, 1.9824));
    assert!((mean - 2.0074).abs() < 1e-12 && (hi - 2.0324).abs() < 1e-12, "{mean} {hi}");
    for train in [false, true] {
        let out = tmp(&format!("band-{train}.svg"));
        plot_svg(&[a.clone(), b.clone(), other.clone()], &out, train, RunLog::record).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        let what = if train { "train loss" } else { "val loss" };
        for t in ["2026-01-02_Fast (2 runs, min–max)", "causal seed 7", "target 2", &format!("{what} vs step")] {
            assert!(texts.contains(&t), "no text {t:?}");
        }
        assert_eq!(svg.lines().filter(|l| l.starts_with("<polygon")).count(), 2, "one band a panel");
    }
    // two runs outside a record folder with one variant and seed: the log's id tells them apart
    let twin =
        parse_log(&write("twin.txt", &with_train_lines(&log_text(&SRC, CFG, VALS, None, false), 7, 0.1))).unwrap();
    let labels: Vec<String> = plot_lines(&[other, twin], false, RunLog::record).into_iter().map(|l| l.label).collect();
    assert_eq!(labels, ["causal seed 7 solo", "causal seed 7 twin"]);
}

// Issue 19: a run stopped by SIGINT/SIGTERM writes a summary with status interrupted; it is no whole run, so stats and
// records-table leave it out (naming it), while a completed or resumed run's log counts.
#[test]
fn interrupted_runs_are_not_whole_runs() {
    let interrupted = SUMMARY.replace(r#""steps":1200"#, r#""status":"interrupted","steps":700"#);
    let resumed = SUMMARY.replace(r#""steps":1200"#, r#""status":"completed","resumed_from_step":700,"steps":1200"#);
    let dir = tmp("records-interrupted").join("linux-c_1xH200").join("2026-12-06_Resume");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("README.md"), "# resumed run\n").unwrap();
    let text = |sm: &str| log_text("", CFG, VALS, Some(sm), true);
    std::fs::write(dir.join("a.txt"), text(&interrupted)).unwrap();
    std::fs::write(dir.join("b.txt"), text(&resumed)).unwrap();
    let logs = parse_logs(&[dir.join("a.txt"), dir.join("b.txt")]).unwrap();
    assert!(logs[0].not_a_whole_run().unwrap().contains("interrupted at step 700"));
    assert_eq!(logs[1].not_a_whole_run(), None);
    let kept = whole_runs(logs);
    assert_eq!(kept.len(), 1);
    assert!(kept[0].path.ends_with("b.txt"));
    let table = records_table(dir.parent().unwrap().parent().unwrap(), false).unwrap();
    let row = table.lines().find(|l| l.contains("2026-12-06_Resume")).unwrap();
    assert_eq!(row.split(" | ").nth(4), Some("1"), "one run counted: {row}");
}

// What race and reproduce pass to train is what was logged: every TrainArgs option survives config → argv → parse.
#[test]
fn config_to_train_argv_round_trips_every_option() {
    let parse = |argv: &[String]| {
        let args = ["train_gpt", "train"].map(String::from).into_iter().chain(argv.iter().cloned());
        let m = Cli::command().try_get_matches_from(args).unwrap();
        serde_json::to_value(TrainArgs::from_arg_matches(m.subcommand_matches("train").unwrap()).unwrap()).unwrap()
    };
    let defaults = Value::Object(train_defaults());
    // a value other than the default for every option: a new option fails here until it is listed
    let other: Value = serde_json::from_str(concat!(
        r#"{"data": "d/a b", "preset": "tiny", "attn": "tau-lt", "device": "cuda:1", "n_layer": 2, "n_head": 3,"#,
        r#""n_kv_head": 1, "n_embd": 96, "seq_len": 33, "vocab_size": 50257, "batch_size": 5, "steps": 7,"#,
        r#""warmup_steps": 1, "cooldown_frac": 0.25, "lr_muon": 0.5, "muon_momentum": 0.9, "ns_steps": 4,"#,
        r#""lr_adam": 1e-10, "adam_beta1": 0.7, "adam_beta2": 0.99, "adam_eps": 1e-8, "val_every": 3,"#,
        r#""val_tokens": 99, "target_val_loss": -1.5, "seed": 11, "dtype": "bf16", "tau_temp": 0.5,"#,
        r#""inv_temp_init": 3.0, "tau": 1.25, "laplacian": "file:x y.npy", "lap_window": 2, "lap_tokens": 1000,"#,
        r#""lap_k": 64, "lap_eps": 0.5, "lap_topk": 3, "lap_p": 2.0, "lap_sigma": 0.1, "nproc": 2, "micro_batch": 1,"#,
        r#""dist_timeout": 5.5, "tau_chunk": 8, "kernels": "fused", "head_chunk": 16, "threads": 3,"#,
        r#""save_checkpoint": "c.safetensors", "sample_tokens": 9, "log_dir": "l", "window": 5, "bands": 3,"#,
        r#""checkpoint_every": 4, "checkpoint_dir": "ck", "keep_checkpoints": 3, "resume": "ck/step_000004"}"#
    ))
    .unwrap();
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&other), keys(&defaults));
    for (k, v) in defaults.as_object().unwrap() {
        assert_ne!(&other[k], v, "{k}: pick a value other than the default");
    }
    let argv = train_argv(other.as_object().unwrap()).unwrap();
    assert!(argv.contains(&"--target-val-loss=-1.5".to_string()) && argv.contains(&"--data=d/a b".to_string()));
    assert_eq!(parse(&argv), other);
    // nulls (no --tau, no --save-checkpoint) are left out, and parse back to null
    assert_eq!(parse(&train_argv(defaults.as_object().unwrap()).unwrap()), defaults);
    assert!(train_argv(json!({"steps": [1]}).as_object().unwrap()).unwrap_err().contains("config key steps"));
}

// A log with these val losses (its summary's final loss the last), shifted by `shift`, of seed `seed`.
fn shifted(name: &str, seed: i64, shift: f64) -> RunLog {
    let vals: Vec<(u64, f64, f64)> = VALS.iter().map(|&(s, t, v)| (s, t, v + shift)).collect();
    let sm = SUMMARY.replace("\"final_val_loss\":1.9824", &format!("\"final_val_loss\":{}", 1.9824 + shift));
    let cfg = CFG.replace("\"seed\":0", &format!("\"seed\":{seed}"));
    parse_log(&write(name, &log_text("", &cfg, &vals, Some(&sm), false))).unwrap()
}

#[test]
fn reproduce_verdict_follows_its_rule() {
    let a = shifted("rep-a.txt", 0, 0.0);
    let r = reproduce_report(std::slice::from_ref(&a), std::slice::from_ref(&a)).unwrap();
    assert!(r.contains("final_val_loss_test: none: one run a side"), "{r}");
    assert!(r.contains("val_loss_max_gap: 0.0000 at step 0 (4 matched steps"), "{r}");
    assert!(r.contains("verdict: same curve within noise: p_two_sided > 0.05"), "{r}");
    // one run a side: the gap alone decides, against SAME_CURVE_MAX_GAP (0.05)
    let near = reproduce_report(std::slice::from_ref(&a), &[shifted("rep-near.txt", 0, 0.04)]).unwrap();
    assert!(near.contains("val_loss_max_gap: 0.0400") && near.contains("verdict: same curve"), "{near}");
    let far = reproduce_report(std::slice::from_ref(&a), &[shifted("rep-far.txt", 0, 0.06)]).unwrap();
    assert!(far.contains("verdict: not the same curve: max gap 0.0600 > 0.05"), "{far}");
    // runs on both sides: Welch's p decides too; 0.03 apart with a spread of 0.001 is another curve
    let old = [a.clone(), shifted("rep-a2.txt", 1, 0.001)];
    let apart = reproduce_report(&old, &[shifted("rep-b1.txt", 0, 0.03), shifted("rep-b2.txt", 1, 0.031)]).unwrap();
    assert!(apart.contains("welch_t") && apart.contains("verdict: not the same curve: p_two_sided 0.0"), "{apart}");
    let mixed = reproduce_report(&old, &[shifted("rep-c1.txt", 0, 0.0005), shifted("rep-c2.txt", 1, 0.0)]).unwrap();
    assert!(
        mixed.contains("welch_t 0.447 df 1.47 p_two_sided 0.7117")
            && mixed.contains("verdict: same curve within noise"),
        "{mixed}"
    );
    assert!(mixed.contains("final_val_loss: original 1.9829 ± 0.0007 rerun 1.9827 ± 0.0004"), "{mixed}");
}

#[test]
fn race_winner_reaches_the_target_first_else_has_the_lowest_loss() {
    let g = |v: &str, runs: &[RunLog]| (v.to_string(), runs.to_vec());
    let slow = [run("rw1.txt", 1.97, Some(1500.0)), run("rw2.txt", 1.96, Some(1700.0))];
    let fast = [run("rw3.txt", 1.99, Some(900.0)), run("rw4.txt", 1.98, Some(1100.0))];
    let missed = [run("rw5.txt", 1.90, None), run("rw6.txt", 1.91, Some(800.0))];
    let r = race_report(Path::new("d"), 2, &[g("a", &slow), g("b", &fast), g("c", &missed)]).unwrap();
    assert!(r.starts_with("race: a, b, c in d, seeds 0..2 of each\n"), "{r}");
    assert!(r.contains("\na: runs 2 time_to_target_s 1.6 ± 0.1 final_val_loss 1.9650 ± 0.0071 ms_per_step -\n"), "{r}");
    assert!(r.contains("\nc: runs 2 time_to_target_s not reached (1/2); - steps in 1.0 ± 0.0 s"), "{r}");
    // each against the first, by compare_report
    assert!(r.contains("compare: causal (2 runs) vs causal (2 runs)\nfinal_val_loss: 1.9850 vs 1.9650"), "{r}");
    assert!(r.ends_with("race_winner: b: every run reached the target, in 1.0 s on average\n"), "{r}");
    let r = race_report(Path::new("d"), 2, &[g("a", &missed), g("b", &[run("rw7.txt", 1.95, None)])]).unwrap();
    assert!(r.contains("b vs a: no test") || r.contains("compare: causal (1 runs) vs causal (2 runs)"), "{r}");
    assert!(
        r.ends_with("race_winner: a: lowest mean final val loss 1.9050 (no variant reached the target in every run)\n")
    );
}
