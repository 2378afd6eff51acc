// tools.rs: records tooling (parse logs of any harness version, statistics against the target, log diffs, SVG
// plots, the README leaderboard, the source tree a log embeds), races and reproductions, and the decode bench. Not
// part of the speedrun, but `mod tools` makes it part of the build, so logs embed it too.

use super::*;
use plotters::prelude::*;
use serde_json::{json, Map, Value};
use similar::{ChangeTag, TextDiff};
use statrs::distribution::{ContinuousCDF, StudentsT};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

#[derive(Debug, Clone)]
pub struct RunLog {
    pub path: String,
    pub source: String,
    pub config: Map<String, Value>,
    pub data: Option<Value>,
    pub summary: Option<Value>,
    pub val: Vec<(u64 /*step*/, f64 /*train_time_ms*/, f64 /*val_loss*/)>,
    pub train: Vec<(u64 /*step*/, f64 /*train_time_ms*/, f64 /*train_loss*/)>,
    pub step_avg_ms: Option<f64>, // last step line
    pub peak_alloc_mib: Option<f64>,
    pub versions: Vec<(String, String)>,
}

/// A separator line: exactly `n` copies of `c` (trailing blanks tolerated).
fn is_rule(l: &str, c: u8, n: usize) -> bool {
    let l = l.trim_end();
    l.len() == n && l.bytes().all(|b| b == c)
}

pub fn parse_log(path: &Path) -> Result<RunLog, String> {
    let p = path.display().to_string();
    let text = read_log_text(path)?.replace("\r\n", "\n");
    let lines: Vec<&str> = text.lines().collect();
    let eq = lines
        .iter()
        .position(|l| is_rule(l, b'=', 100))
        .ok_or_else(|| format!("{p}: not a train_gpt log (no '=' separator line); pass a file from logs/"))?;
    let mut log = RunLog {
        path: p,
        source: lines[..eq].join("\n"),
        config: Map::new(),
        data: None,
        summary: None,
        val: vec![],
        train: vec![],
        step_avg_ms: None,
        peak_alloc_mib: None,
        versions: vec![],
    };
    // The version block ends at the second '=' rule; older or truncated logs may lack it, so it also ends
    // at the first record line.
    let rest = &lines[eq + 1..];
    let hdr = rest
        .iter()
        .position(|l| is_rule(l, b'=', 100) || l.starts_with("config:") || l.starts_with("step:"))
        .unwrap_or(rest.len());
    let mut smi = false;
    for l in &rest[..hdr] {
        if let Some(v) = l.split("Driver Version:").nth(1) {
            log.versions.push(("driver".into(), v.split_whitespace().next().unwrap_or("").into()));
        } else if smi {
            // the rest of the raw nvidia-smi table is not a version
        } else if let Some((k, v)) = l.split_once(':').filter(|(k, _)| !k.is_empty() && !k.contains(' ')) {
            smi = k == "nvidia-smi";
            if !smi {
                log.versions.push((k.into(), v.trim().into()));
            }
        }
    }
    for l in &rest[hdr..] {
        // A record whose JSON doesn't parse (e.g. cut off by a crash) counts as missing.
        let rec = |k: &str| l.strip_prefix(k).and_then(|s| serde_json::from_str::<Value>(s).ok());
        if let Some(Value::Object(m)) = rec("config:") {
            log.config = m;
        } else if let Some(v) = rec("data:") {
            log.data = Some(v);
        } else if let Some(v) = rec("summary:") {
            log.summary = Some(v);
        } else if let Some(s) = l.strip_prefix("peak memory allocated:") {
            log.peak_alloc_mib = s.split_whitespace().next().and_then(|x| x.parse().ok());
        } else if l.starts_with("step:") {
            let kv: BTreeMap<&str, &str> = l.split_whitespace().filter_map(|t| t.split_once(':')).collect();
            let num = |k: &str| kv.get(k).and_then(|v| v.trim_end_matches("ms").parse::<f64>().ok());
            let Some(step) = kv["step"].split('/').next().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some(v) = num("val_loss") {
                log.val.push((step, num("train_time").unwrap_or(f64::NAN), v));
            }
            if let Some(v) = num("train_loss") {
                log.train.push((step, num("train_time").unwrap_or(f64::NAN), v));
            }
            log.step_avg_ms = num("step_avg").or(log.step_avg_ms);
        }
    }
    log.peak_alloc_mib = log.peak_alloc_mib.or_else(|| log.sum("peak_alloc_mib"));
    Ok(log)
}

impl RunLog {
    fn sum(&self, k: &str) -> Option<f64> {
        self.summary.as_ref()?.get(k)?.as_f64()
    }
    pub fn variant(&self) -> String {
        let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        s(self.summary.as_ref().and_then(|m| m.get("variant")))
            .or_else(|| s(self.config.get("variant")))
            .or_else(|| s(self.config.get("attn")))
            .unwrap_or_else(|| "unknown".into())
    }
    pub fn final_val_loss(&self) -> Option<f64> {
        self.sum("final_val_loss").or(self.val.last().map(|v| v.2))
    }
    pub fn target(&self) -> Option<f64> {
        self.sum("target_val_loss").or_else(|| self.config.get("target_val_loss")?.as_f64())
    }
    pub fn time_to_target_ms(&self) -> Option<f64> {
        // A summary's null means "not reached"; only logs without the key are re-derived from val lines.
        match self.summary.as_ref().and_then(|s| s.get("time_to_target_ms")) {
            Some(v) => v.as_f64(),
            None => self.val.iter().find(|v| v.2 <= self.target().unwrap_or(f64::NAN)).map(|v| v.1),
        }
    }
    pub fn train_time_ms(&self) -> Option<f64> {
        self.sum("train_time_ms").or(self.val.last().map(|v| v.1).filter(|t| t.is_finite()))
    }
    fn ms_per_step(&self) -> Option<f64> {
        self.sum("ms_per_step").or(self.step_avg_ms)
    }
    fn tokens_per_s(&self) -> Option<f64> {
        self.sum("tokens_per_s")
    }
    /// The variant, and for tau runs the Laplacian source: `tau/chain`.
    fn label(&self) -> String {
        match self.summary.as_ref().and_then(|s| s.get("laplacian")).and_then(Value::as_str) {
            Some(lap) => format!("{}/{lap}", self.variant()),
            None => self.variant(),
        }
    }
    /// Why this log is not a whole run (None: it is): cut before its summary (a crash, a kill), interrupted by a
    /// signal, or a summary of other steps than configured.
    pub fn not_a_whole_run(&self) -> Option<String> {
        let Some(s) = &self.summary else {
            return Some("no summary line: the run was cut short (a crash or a kill)".into());
        };
        let steps = |v: Option<&Value>| v.and_then(Value::as_i64);
        if s.get("status").and_then(Value::as_str) == Some("interrupted") {
            let at = steps(s.get("steps")).map_or("?".into(), |k| k.to_string());
            return Some(format!("interrupted at step {at} (SIGINT/SIGTERM); --resume its checkpoint to finish it"));
        }
        match (steps(s.get("steps")), steps(self.config.get("steps"))) {
            (Some(done), Some(want)) if done != want => Some(format!("its summary has {done} of {want} steps")),
            _ => None,
        }
    }
    /// The record folder the log sits in (`<YYYY-MM-DD>_<Name>`), if it sits in one.
    pub fn record(&self) -> Option<String> {
        let dir = Path::new(&self.path).parent()?.file_name()?.to_string_lossy().to_string();
        let b = dir.as_bytes();
        let date = b.len() > 11 && [4, 7].iter().all(|&i| b[i] == b'-') && b[10] == b'_';
        (date && [0, 1, 2, 3, 5, 6, 8, 9].iter().all(|&i| b[i].is_ascii_digit())).then_some(dir)
    }
    pub fn seed(&self) -> Option<i64> {
        self.config.get("seed")?.as_i64()
    }
    /// Per step: (train loss, val loss, train_time_ms), the validation's exact time where there is one.
    pub fn curve(&self) -> BTreeMap<u64, (Option<f64>, Option<f64>, f64)> {
        let mut c = BTreeMap::new();
        for &(s, t, v) in &self.train {
            c.insert(s, (Some(v), None, t));
        }
        for &(s, t, v) in &self.val {
            let e = c.entry(s).or_insert((None, None, t));
            (e.1, e.2) = (Some(v), t);
        }
        c
    }
    /// Log file stem, cut to a uuid's first group, to tell runs of one variant apart.
    fn short_id(&self) -> String {
        Path::new(&self.path).file_stem().map_or(String::new(), |s| s.to_string_lossy().chars().take(8).collect())
    }
}

#[derive(Debug, Clone)]
pub struct Stats {
    pub n: usize,
    pub loss_mean: f64,
    pub loss_std: f64,
    pub time_mean: f64,
    pub time_std: f64,
    pub time_kind: &'static str,
    pub target: f64,
    pub t: f64,
    pub p_value: f64,
    pub missed: Vec<String>, // logs of runs that never reached the target
}

type Metric = fn(&RunLog) -> Option<f64>;

fn mean_std(x: &[f64]) -> (f64, f64) {
    let m = x.iter().sum::<f64>() / x.len() as f64;
    (m, (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt())
}

/// One-sided one-sample t-test of final val loss, H0: mean >= target vs H1: mean < target.
pub fn stats(logs: &[RunLog]) -> Result<Stats, String> {
    if logs.len() < 2 {
        return Err(format!("stats: need at least 2 logs, got {}", logs.len()));
    }
    let one = |what: &str, set: BTreeSet<String>| match set.len() {
        1 => Ok(()),
        _ => Err(format!(
            "stats: mixed {what}s ({}); pass logs of one {what}",
            set.into_iter().collect::<Vec<_>>().join(", ")
        )),
    };
    one("variant", logs.iter().map(RunLog::variant).collect())?;
    let each = |what: &str, f: &dyn Fn(&RunLog) -> Option<f64>| -> Result<Vec<f64>, String> {
        logs.iter().map(|l| f(l).ok_or_else(|| format!("{}: no {what}", l.path))).collect()
    };
    let targets = each("target_val_loss", &RunLog::target)?;
    one("target", targets.iter().map(f64::to_string).collect())?;
    let loss = each("final val loss", &RunLog::final_val_loss)?;
    let reached = logs.iter().all(|l| l.time_to_target_ms().is_some());
    let (time_kind, f): (&str, Metric) = match reached {
        true => ("time_to_target_ms", RunLog::time_to_target_ms),
        false => ("train_time_ms", RunLog::train_time_ms),
    };
    let time = each(time_kind, &f)?;
    let ((loss_mean, loss_std), (time_mean, time_std), n) = (mean_std(&loss), mean_std(&time), logs.len());
    let t = (loss_mean - targets[0]) / (loss_std / (n as f64).sqrt());
    // identical losses equal to the target give t = 0/0; statrs would be fed a NaN
    let p_value =
        if t.is_nan() { f64::NAN } else { StudentsT::new(0.0, 1.0, (n - 1) as f64).map_err(|e| e.to_string())?.cdf(t) };
    let missed = logs.iter().filter(|l| l.time_to_target_ms().is_none()).map(|l| l.path.clone()).collect();
    Ok(Stats { n, loss_mean, loss_std, time_mean, time_std, time_kind, target: targets[0], t, p_value, missed })
}

/// Welch's unequal-variance t-test, two-sided: (t, Welch–Satterthwaite df, p).
pub fn welch(a: &[f64], b: &[f64]) -> Result<(f64, f64, f64), String> {
    if a.len() < 2 || b.len() < 2 {
        return Err(format!("compare: need at least 2 runs a side, got {} and {}", a.len(), b.len()));
    }
    let ((ma, sa), (mb, sb)) = (mean_std(a), mean_std(b));
    let (va, vb) = (sa * sa / a.len() as f64, sb * sb / b.len() as f64);
    if va + vb == 0.0 {
        // no spread on either side (e.g. times rounded to the same ms): equal means do not differ, unequal ones surely
        // do
        let df = (a.len() + b.len() - 2) as f64;
        return Ok(if ma == mb { (0.0, df, 1.0) } else { ((ma - mb).signum() * f64::INFINITY, df, 0.0) });
    }
    let t = (ma - mb) / (va + vb).sqrt();
    let df = (va + vb).powi(2) / (va * va / (a.len() - 1) as f64 + vb * vb / (b.len() - 1) as f64);
    let p = 2.0 * StudentsT::new(0.0, 1.0, df).map_err(|e| e.to_string())?.cdf(-t.abs());
    Ok((t, df, p))
}

/// One run against a set: z = (x − mean)/σ of the set, and the two-sided p that a new run of the set lands as far
/// out (the prediction t: (x − mean)/(σ·√(1 + 1/n)), n − 1 df). Returns (z, df, p).
pub fn one_vs_set(x: f64, set: &[f64]) -> Result<(f64, f64, f64), String> {
    if set.len() < 2 {
        return Err(format!("compare: one run against {} needs at least 2 runs on the other side", set.len()));
    }
    let ((m, sd), n) = (mean_std(set), set.len() as f64);
    if sd == 0.0 {
        return Ok(if x == m { (0.0, n - 1.0, 1.0) } else { ((x - m).signum() * f64::INFINITY, n - 1.0, 0.0) });
    }
    let t = (x - m) / (sd * (1.0 + 1.0 / n).sqrt());
    let p = 2.0 * StudentsT::new(0.0, 1.0, n - 1.0).map_err(|e| e.to_string())?.cdf(-t.abs());
    Ok(((x - m) / sd, n - 1.0, p))
}

fn fmt_p(p: f64) -> String {
    if p >= 1e-3 || p == 0.0 {
        format!("{p:.4}")
    } else {
        format!("{p:.3e}")
    }
}

/// The two-sided test of a difference between x and y: Welch's t-test, or with one run on a side, that run's z-score
/// against the other side's spread. Returns (what, t or z, df, p).
fn two_sided(x: &[f64], y: &[f64]) -> Result<(String, f64, f64, f64), String> {
    Ok(match (x.len(), y.len()) {
        (1, 1) => {
            return Err("compare: one run a side has no spread to test against; pass 2 or more runs on one side".into())
        }
        (1, _) => {
            let (z, df, p) = one_vs_set(x[0], y)?;
            (format!("z {z:.3} (a's one run against b's spread, σ {:.4})", mean_std(y).1), z, df, p)
        }
        (_, 1) => {
            let (z, df, p) = one_vs_set(y[0], x)?;
            (format!("z {:.3} (b's one run against a's spread, σ {:.4})", -z, mean_std(x).1), -z, df, p)
        }
        _ => {
            let (t, df, p) = welch(x, y)?;
            (format!("welch_t {t:.3}"), t, df, p)
        }
    })
}

/// Two sets of runs side by side: final val loss and time, each with a two-sided test of the difference (Welch's
/// t-test, or with one run on a side, that run's z-score against the other side's spread), then the winner. Time is
/// time-to-target when every run of both sides reached the target; runs that missed it are named, and the whole
/// runs' training times are compared instead.
pub fn compare_report(a: &[RunLog], b: &[RunLog]) -> Result<String, String> {
    let col = |logs: &[RunLog], f: Metric, what: &str| -> Result<Vec<f64>, String> {
        logs.iter().map(|l| f(l).ok_or_else(|| format!("{}: no {what}", l.path))).collect()
    };
    let reached = |logs: &[RunLog]| logs.iter().filter(|l| l.time_to_target_ms().is_some()).count();
    let (ra, rb) = (reached(a) == a.len(), reached(b) == b.len());
    let (tk, tf): (&str, Metric) = if ra && rb {
        ("time_to_target_ms", RunLog::time_to_target_ms)
    } else {
        ("train_time_ms", RunLog::train_time_ms)
    };
    let mut out = format!("compare: {} ({} runs) vs {} ({} runs)\n", a[0].label(), a.len(), b[0].label(), b.len());
    if !(ra && rb) {
        out += &format!(
            "time_to_target_ms: not compared: a reached the target in {}/{} runs, b in {}/{}; the whole runs' \
             train_time_ms instead\n",
            reached(a),
            a.len(),
            reached(b),
            b.len()
        );
        for l in a.iter().chain(b).filter(|l| l.time_to_target_ms().is_none()) {
            out += &format!("missed the target: {} (final val loss {})\n", l.path, opt(l.final_val_loss(), 4));
        }
    }
    let mut j = Map::new();
    let mut tests = BTreeMap::new();
    for (name, f) in [("final_val_loss", RunLog::final_val_loss as Metric), (tk, tf)] {
        let (x, y) = (col(a, f, name)?, col(b, f, name)?);
        let (mx, my) = (mean_std(&x).0, mean_std(&y).0);
        let (test, stat, df, p) = two_sided(&x, &y)?;
        out += &format!("{name}: {mx:.4} vs {my:.4} diff {:.4} {test} df {df:.2} p_two_sided {p:.3e}\n", mx - my);
        let kind = if x.len() == 1 || y.len() == 1 { "z" } else { "t" };
        j.insert(name.to_string(), json!({"a": mx, "b": my, kind: stat, "df": df, "p": p}));
        tests.insert(name, (mx, my, p));
    }
    // The speedrun's rule: reaching the target first wins; a side that missed it loses to one that did not; where
    // neither side always reached it, the lower final val loss wins.
    let side = |first: bool| match first {
        true => format!("a ({})", a[0].label()),
        false => format!("b ({})", b[0].label()),
    };
    let (metric, why) = match (ra, rb) {
        (true, true) => ("time_to_target_ms", String::new()),
        (false, false) => ("final_val_loss", " (neither side reached the target in every run)".into()),
        _ => ("final_val_loss", String::new()),
    };
    let (ma, mb, p) = tests[metric];
    let winner = match (ra, rb) {
        (true, false) => Some(true),
        (false, true) => Some(false),
        _ if ma == mb => None,
        _ => Some(ma < mb),
    };
    let sig = if p < 0.05 { "" } else { "; not significant at 0.05" };
    out += &match winner {
        None => format!("winner: none: a and b are equal in {metric}{why}\n"),
        Some(w) if ra != rb => format!(
            "winner: {}: every run reached the target, {} missed it in {} run(s); final_val_loss p_two_sided {}{sig}\n",
            side(w),
            side(!w),
            if w { b.len() - reached(b) } else { a.len() - reached(a) },
            fmt_p(p)
        ),
        Some(w) => format!(
            "winner: {} by {metric} {:.4} vs {:.4}{why}, p_two_sided {}{sig}\n",
            side(w),
            ma.min(mb),
            ma.max(mb),
            fmt_p(p)
        ),
    };
    j.insert("winner".into(), json!(winner.map(|w| if w { "a" } else { "b" })));
    out += &format!("compare_json: {}", Value::Object(j));
    Ok(out)
}

/// One run against the target: its final val loss, and its time-to-target or that it missed the target.
pub fn single_report(l: &RunLog) -> Result<String, String> {
    let loss = l.final_val_loss().ok_or_else(|| format!("{}: no final val loss", l.path))?;
    let target = l.target().ok_or_else(|| format!("{}: no target_val_loss", l.path))?;
    let time = match l.time_to_target_ms() {
        Some(t) => format!("time_to_target_ms: {t:.1}\n"),
        None => format!(
            "time_to_target_ms: none: missed the target by {:.4} (train_time_ms {})\n",
            loss - target,
            opt(l.train_time_ms(), 1)
        ),
    };
    Ok(format!(
        "runs: 1 (no spread: no t-test against the target)\ntarget_val_loss: {target}\nfinal_val_loss: {loss:.4}\n\
         {time}"
    ))
}

pub fn stats_report(s: &Stats) -> String {
    let k = s.time_kind;
    let j = json!({"n": s.n, "loss_mean": s.loss_mean, "loss_std": s.loss_std, "time_kind": k, "time_mean": s.time_mean,
        "time_std": s.time_std, "target": s.target, "t": s.t, "p_value": s.p_value, "missed": s.missed});
    let mut missed = format!("reached_target: {}/{}\n", s.n - s.missed.len(), s.n);
    if !s.missed.is_empty() {
        missed += "time: not time-to-target (runs missed the target): train_time_ms of the whole runs\n";
        s.missed.iter().for_each(|p| missed += &format!("missed the target: {p}\n"));
    }
    format!(
        "runs: {}\ntarget_val_loss: {}\nval_loss_mean: {:.6}\nval_loss_std: {:.6}\n{missed}{k}_mean: {:.1}\n\
         {k}_std: {:.1}\nt: {:.4}\np_value: {}\nstats: {j}\n",
        s.n,
        s.target,
        s.loss_mean,
        s.loss_std,
        s.time_mean,
        s.time_std,
        s.t,
        if s.p_value >= 1e-3 { format!("{:.4}", s.p_value) } else { format!("{:.3e}", s.p_value) }
    )
}

/// For each line of an embedded source, the innermost Rust `fn` around it (syn parses the source; a source that
/// does not parse owns nothing); lines after the 40-dash rule belong to the kernel file named by the `# kernels/..`
/// header above them.
fn fn_owners(src: &str) -> Vec<Option<String>> {
    let lines: Vec<&str> = src.lines().collect();
    let rust = lines.iter().position(|l| is_rule(l, b'-', 40)).unwrap_or(lines.len());
    let mut out = vec![None; lines.len()];
    struct Fns(Vec<(String, usize, usize)>); // (name, first line, last line), 1-based
    impl<'a> syn::visit::Visit<'a> for Fns {
        fn visit_item_fn(&mut self, f: &'a syn::ItemFn) {
            self.0.push((f.sig.ident.to_string(), f.span_lines().0, f.span_lines().1));
            syn::visit::visit_item_fn(self, f);
        }
        fn visit_impl_item_fn(&mut self, f: &'a syn::ImplItemFn) {
            self.0.push((f.sig.ident.to_string(), f.span_lines().0, f.span_lines().1));
            syn::visit::visit_impl_item_fn(self, f);
        }
        fn visit_trait_item_fn(&mut self, f: &'a syn::TraitItemFn) {
            self.0.push((f.sig.ident.to_string(), f.span_lines().0, f.span_lines().1));
            syn::visit::visit_trait_item_fn(self, f);
        }
    }
    trait SpanLines {
        fn span_lines(&self) -> (usize, usize);
    }
    impl<T: syn::spanned::Spanned> SpanLines for T {
        fn span_lines(&self) -> (usize, usize) {
            let s = self.span();
            (s.start().line, s.end().line)
        }
    }
    if let Ok(file) = syn::parse_file(&lines[..rust].join("\n")) {
        let mut fns = Fns(vec![]);
        syn::visit::Visit::visit_file(&mut fns, &file);
        // outer functions come first in visiting order, so later (inner) ones overwrite them
        for (name, first, last) in fns.0 {
            (first..=last).for_each(|l| out[l - 1] = Some(name.clone()));
        }
    }
    // a file's header is the `# <path>` line right after a rule: run.sh and Cargo.toml hold `# ` comments of their own
    let mut kernel = None::<String>;
    for (i, l) in lines.iter().enumerate().skip(rust) {
        if i > 0 && is_rule(lines[i - 1], b'-', 40) {
            kernel = l.strip_prefix("# ").map(|k| k.trim().to_string()).or(kernel);
        }
        out[i] = kernel.clone();
    }
    out
}

/// The files a log's source block holds, in order: train_gpt.rs, then each `# <path>` that follows a 40-dash rule,
/// each text with the one final newline that the log trims.
pub fn embedded_files(source: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = source.lines().collect();
    let mut files = vec![("train_gpt.rs".to_string(), vec![])];
    let mut i = 0;
    while i < lines.len() {
        match lines[i + 1..].first().and_then(|h| h.strip_prefix("# ")) {
            Some(path) if is_rule(lines[i], b'-', 40) => {
                files.push((path.trim().to_string(), vec![]));
                i += 2;
            }
            _ => {
                files.last_mut().unwrap().1.push(lines[i]);
                i += 1;
            }
        }
    }
    let mut files: Vec<(String, String)> = files.into_iter().map(|(p, l)| (p, l.join("\n") + "\n")).collect();
    // Older harnesses held a rule and a `# ` line inside a string of their own tests: a Rust file that does not parse
    // until the section after it is put back was cut there.
    let mut i = 0;
    while i + 1 < files.len() {
        let (p, text) = &files[i];
        if p.ends_with(".rs") && syn::parse_file(text).is_err() {
            let (next, rest) = files.remove(i + 1);
            files[i].1 += &format!("{}\n# {next}\n{rest}", "-".repeat(40));
        } else {
            i += 1;
        }
    }
    files
}

/// `train_gpt source LOG --out DIR`: the embedded tree, written into a temporary sibling of DIR that is renamed into
/// place, so a failure leaves no half tree.
pub fn cmd_source(log: &Path, out: &Path) -> Res<()> {
    let o = out.display();
    if !new_or_empty(out) {
        return Err(format!("{o}: exists and is not an empty folder; pass a new or empty --out folder"));
    }
    let l = parse_log(log)?;
    let files = embedded_files(&l.source);
    for (p, _) in &files {
        if !Path::new(p).components().all(|c| matches!(c, std::path::Component::Normal(_))) {
            return Err(format!("{}: embedded path {p:?} leaves the tree; pass a log written by train_gpt", l.path));
        }
    }
    write_dir_atomic(out, "--out", |tmp| {
        for (p, text) in &files {
            let f = tmp.join(p);
            std::fs::create_dir_all(f.parent().unwrap())
                .and_then(|_| std::fs::write(&f, text))
                .map_err(|e| format!("{}; pass a writable --out folder", io_error(&f, "write", &e)))?;
        }
        Ok(())
    })?;
    let names: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
    println!("wrote {} files to {o}: {}", files.len(), names.join(", "));
    for k in ["git_commit", "git_dirty", "embedded_files_match_checkout", "command"] {
        if let Some((_, v)) = l.versions.iter().find(|(x, _)| x == k) {
            println!("{k}: {v}");
        }
    }
    let missing: Vec<&str> =
        ["tools.rs", "Cargo.toml", "Cargo.lock", "build.rs"].into_iter().filter(|f| !names.contains(f)).collect();
    match missing.is_empty() {
        true => println!("build: cd {o} && ./run.sh setup"),
        false => println!(
            "note: the log predates embedded build files; {} are missing: take them from the harness's git history",
            missing.join(", ")
        ),
    }
    Ok(())
}

fn opt(x: Option<f64>, prec: usize) -> String {
    x.map_or("-".into(), |x| format!("{x:.prec$}"))
}

/// Reads a log, plain or gzipped (`.gz`: committed records are compressed).
pub fn read_log_text(path: &Path) -> Result<String, String> {
    let p = path.display();
    let bytes = std::fs::read(path).map_err(|e| format!("{p}: {e}; pass a train_gpt log (logs/ or records/)"))?;
    let bytes = match path.extension().is_some_and(|x| x == "gz") {
        true => {
            let mut out = vec![];
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut out)
                .map_err(|e| format!("{p}: not a readable gzip file ({e}); pass a .txt log or a whole .txt.gz"))?;
            out
        }
        false => bytes,
    };
    String::from_utf8(bytes).map_err(|_| format!("{p}: not UTF-8 text; pass a train_gpt log (logs/ or records/)"))
}

/// A log file by its name: `<uuid>.txt`, or `<uuid>.txt.gz` as committed under records/.
pub fn is_log_file(p: &Path) -> bool {
    p.is_file()
        && p.file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(".txt") || n.to_string_lossy().ends_with(".txt.gz"))
}

/// A track folder is named `<corpus>_<N>x<GPU>` (linux-c_1xH200); records/bench and records/reference are not tracks.
fn is_track(name: &str) -> bool {
    name.rsplit_once('_')
        .and_then(|(_, g)| g.split_once('x'))
        .is_some_and(|(n, gpu)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && !gpu.is_empty())
}

/// Mean ± σ of a figure over runs (one run: its figure; none: "-").
fn pm_of(logs: &[RunLog], f: Metric, prec: usize) -> String {
    let x: Vec<f64> = logs.iter().filter_map(f).collect();
    match x.len() {
        0 => "-".to_string(),
        1 => format!("{:.prec$}", x[0]),
        _ => {
            let (m, s) = mean_std(&x);
            format!("{m:.prec$} ± {s:.prec$}")
        }
    }
}

/// Time-to-target in s when every run reached the target, else how many did and the time of all steps.
fn time_cell(logs: &[RunLog]) -> String {
    let reached = logs.iter().filter(|l| l.time_to_target_ms().is_some()).count();
    match reached == logs.len() {
        true => pm_of(logs, |l| l.time_to_target_ms().map(|t| t / 1e3), 1),
        false => format!(
            "not reached ({reached}/{}); {} steps in {} s",
            logs.len(),
            logs[0].config.get("steps").map_or("-".into(), Value::to_string),
            pm_of(logs, |l| l.train_time_ms().map(|t| t / 1e3), 1)
        ),
    }
}

/// One record: a folder `<track>/<YYYY-MM-DD>_<Name>/` of run logs and a README whose first line is `# <description>`.
struct Record {
    track: String,
    name: String,
    rel: String,
    logs: Vec<RunLog>,
    description: String,
}

impl Record {
    /// The speedrun's clock: mean time-to-target when every run reached the target, else mean training time of the
    /// whole run (every run of a variant trains the same number of steps). `true` when the target was reached.
    fn time_s(&self) -> (bool, f64) {
        let ttt: Vec<f64> = self.logs.iter().filter_map(RunLog::time_to_target_ms).collect();
        match ttt.len() == self.logs.len() {
            true => (true, mean_std(&ttt).0 / 1e3),
            false => (false, mean_std(&self.logs.iter().filter_map(RunLog::train_time_ms).collect::<Vec<_>>()).0 / 1e3),
        }
    }
    fn row(&self) -> String {
        let logs = &self.logs;
        let p = stats(logs)
            .map(|st| if st.p_value >= 1e-3 { format!("{:.4}", st.p_value) } else { format!("{:.1e}", st.p_value) })
            .unwrap_or("-".into());
        let gpu =
            logs[0].versions.iter().find(|(k, _)| k == "gpu").map_or("-", |(_, v)| v.trim_start_matches("NVIDIA "));
        format!(
            "| {} | [{}]({}/) | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            logs[0].label(),
            self.name.get(11..).unwrap_or(&self.name),
            self.rel,
            time_cell(logs),
            pm_of(logs, RunLog::final_val_loss, 4),
            logs.len(),
            p,
            pm_of(logs, RunLog::ms_per_step, 1),
            gpu,
            self.name.get(..10).unwrap_or("-"),
            self.description
        )
    }
}

/// The README leaderboard, every figure recomputed from the logs (a test holds the README to it): per track, the
/// current record of each variant (variant and Laplacian: the fastest to the target, or, where no record reaches
/// it, the fastest through its steps), then, unless `current_only`, the earlier records.
pub fn records_table(root: &Path, current_only: bool) -> Result<String, String> {
    let dirs = |p: &Path| -> Result<Vec<std::path::PathBuf>, String> {
        let rd =
            std::fs::read_dir(p).map_err(|e| format!("{}: {e}; pass the records folder (records/)", p.display()))?;
        let mut v: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
        v.sort();
        Ok(v)
    };
    const HEAD: &str =
        "| variant | record | time-to-target (s) | final val loss | runs | p (< target) | ms/step | GPU | \
                        date | description |\n|---|---|---|---|---|---|---|---|---|---|\n";
    let mut out = String::new();
    for track in dirs(root)? {
        let tname = track.file_name().unwrap().to_string_lossy().to_string();
        if !is_track(&tname) {
            continue;
        }
        let mut recs = vec![];
        for rec in dirs(&track)? {
            let mut files: Vec<_> = std::fs::read_dir(&rec)
                .map_err(|e| format!("{}: {e}", rec.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_log_file(p))
                .collect();
            files.sort();
            let logs = whole_runs(files.iter().map(|p| parse_log(p)).collect::<Result<Vec<_>, _>>()?);
            if logs.is_empty() {
                continue;
            }
            let name = rec.file_name().unwrap().to_string_lossy().to_string();
            let readme = std::fs::read_to_string(rec.join("README.md")).unwrap_or_default();
            let description =
                readme.lines().next().and_then(|l| l.strip_prefix("# ")).unwrap_or("-").trim().to_string();
            let rel = rec.strip_prefix(root.parent().unwrap_or(Path::new(""))).unwrap_or(&rec).display().to_string();
            recs.push(Record { track: tname.clone(), name, rel, logs, description });
        }
        if recs.is_empty() {
            continue; // a track folder with no record in it yet
        }
        // current = the best clock per variant: reached the target first, then less time; ties go to the newer record
        let clock = |a: &Record, b: &Record| {
            let ((ra, ta), (rb, tb)) = (a.time_s(), b.time_s());
            rb.cmp(&ra).then(ta.total_cmp(&tb)) // a total order, NaN times too
        };
        let mut labels: Vec<String> = recs.iter().map(|r| r.logs[0].label()).collect();
        labels.sort();
        labels.dedup();
        let mut current = vec![];
        for l in &labels {
            let best = recs
                .iter()
                .filter(|r| &r.logs[0].label() == l)
                .min_by(|a, b| clock(a, b).then(b.name.cmp(&a.name)))
                .unwrap();
            current.push(best.name.clone());
        }
        let (mut now, mut before): (Vec<&Record>, Vec<&Record>) = recs.iter().partition(|r| current.contains(&r.name));
        now.sort_by(|a, b| clock(a, b));
        before.sort_by(|a, b| a.logs[0].label().cmp(&b.logs[0].label()).then(clock(b, a)));
        out += &format!("**{}**: current records\n\n{HEAD}", now[0].track);
        now.iter().for_each(|r| out += &r.row());
        if !before.is_empty() && !current_only {
            out += &format!("\n**{}**: earlier records\n\n{HEAD}", now[0].track);
            before.iter().for_each(|r| out += &r.row());
        }
        out += "\n";
    }
    if out.is_empty() {
        return Err(format!("{}: no track folders (<corpus>_<N>x<GPU>/<date>_<Name>/ with logs)", root.display()));
    }
    Ok(out)
}

pub fn diff_report(a: &RunLog, b: &RunLog) -> String {
    let mut o = format!("a: {} ({})\nb: {} ({})\n", a.path, a.variant(), b.path, b.variant());

    let js = |v: Option<&Value>| v.map_or("-".to_string(), Value::to_string);
    let keys: BTreeSet<&String> = a.config.keys().chain(b.config.keys()).collect();
    let cfg: Vec<String> = keys
        .into_iter()
        .filter(|k| a.config.get(*k) != b.config.get(*k))
        .map(|k| format!("  {k}: {} -> {}\n", js(a.config.get(k)), js(b.config.get(k))))
        .collect();
    o += &format!("config: {} key(s) differ\n{}", cfg.len(), cfg.concat());

    let (oa, ob) = (fn_owners(&a.source), fn_owners(&b.source));
    let (mut add, mut del, mut fns) = (0, 0, Vec::<String>::new());
    for c in TextDiff::from_lines(&a.source, &b.source).iter_all_changes() {
        let (owners, line) = match c.tag() {
            ChangeTag::Equal => continue,
            ChangeTag::Delete => {
                del += 1;
                (&oa, c.old_index())
            }
            ChangeTag::Insert => {
                add += 1;
                (&ob, c.new_index())
            }
        };
        let name = line.and_then(|i| owners.get(i).cloned().flatten()).unwrap_or_else(|| "<top level>".into());
        if !fns.contains(&name) {
            fns.push(name);
        }
    }
    o += &match add + del {
        0 => "source: identical\n".to_string(),
        _ => format!("source: +{add} -{del} lines; functions touched: {}\n", fns.join(", ")),
    };

    let bv: BTreeMap<u64, f64> = b.val.iter().map(|v| (v.0, v.2)).collect();
    let rows: Vec<String> = a
        .val
        .iter()
        .filter_map(|&(s, _, x)| bv.get(&s).map(|y| format!("{s:>8} {x:>9.4} {y:>9.4} {:>+9.4}\n", y - x)))
        .collect();
    o += &match rows.len() {
        0 => "val_loss: no matched steps\n".to_string(),
        _ => format!("val_loss at matched steps:\n{:>8} {:>9} {:>9} {:>9}\n{}", "step", "a", "b", "b-a", rows.concat()),
    };

    o += &format!("{:<18} {:>12} {:>12} {:>8}\n", "metric", "a", "b", "b/a");
    let metrics: [(&str, Metric); 4] = [
        ("time_to_target_ms", RunLog::time_to_target_ms),
        ("ms_per_step", RunLog::ms_per_step),
        ("tokens_per_s", RunLog::tokens_per_s),
        ("peak_alloc_mib", |l| l.peak_alloc_mib),
    ];
    for (name, f) in metrics {
        let (x, y) = (f(a), f(b));
        let r = x.zip(y).filter(|(x, _)| *x != 0.0).map(|(x, y)| y / x);
        o += &format!("{name:<18} {:>12} {:>12} {:>8}\n", opt(x, 2), opt(y, 2), opt(r, 3));
    }
    o
}

/// Renders into memory first, then writes whole (write_atomic), so a failure leaves no partial SVG. Logs with the
/// same `group` key (the record folder for `plot`, the variant for `race`) make one line, their mean in a min–max band.
pub fn plot_svg(logs: &[RunLog], out: &Path, train: bool, group: fn(&RunLog) -> Option<String>) -> Result<(), String> {
    check_output(out, "--out", true)?;
    let mut svg = String::new();
    let mut targets: Vec<f64> = logs.iter().filter_map(RunLog::target).collect();
    targets.sort_by(f64::total_cmp);
    targets.dedup();
    draw(&plot_lines(logs, train, group), &targets, if train { "train loss" } else { "val loss" }, &mut svg)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    write_atomic(out, svg.as_bytes(), Existing::Replace).map(|_| ())
}

type Pt = (f64 /*time s*/, f64 /*step*/, f64 /*mean loss*/, f64 /*min*/, f64 /*max*/);

/// One line of a plot: a log, or the runs of one group (a record folder) as their mean at the steps all of them
/// logged, with the min–max band over them, so that a plot of many records stays one line a record.
struct PlotLine {
    label: String,
    pts: Vec<Pt>,
    runs: usize,
}

/// Runs' mean loss at the steps all of them logged, with its min and max, at their mean time.
fn mean_band(ls: &[&RunLog], train: bool) -> Vec<Pt> {
    let mut at: BTreeMap<u64, Vec<(f64, f64)>> = BTreeMap::new();
    for l in ls {
        for &(s, t, y) in if train { &l.train } else { &l.val } {
            // log y: a loss must be positive
            if t.is_finite() && y.is_finite() && y > 0.0 {
                at.entry(s).or_default().push((t, y));
            }
        }
    }
    at.into_iter()
        .filter(|(_, v)| v.len() == ls.len())
        .map(|(s, v)| {
            let n = v.len() as f64;
            let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
            (v.iter().map(|p| p.0).sum::<f64>() / n / 1e3, s as f64, v.iter().map(|p| p.1).sum::<f64>() / n, lo, hi)
        })
        .collect()
}

fn plot_lines(logs: &[RunLog], train: bool, group: fn(&RunLog) -> Option<String>) -> Vec<PlotLine> {
    let mut groups: Vec<(Option<String>, Vec<&RunLog>)> = vec![];
    for l in logs {
        let rec = group(l);
        match groups.iter_mut().find(|g| rec.is_some() && g.0 == rec) {
            Some(g) => g.1.push(l),
            None => groups.push((rec, vec![l])),
        }
    }
    let mut lines: Vec<(PlotLine, String)> = groups
        .into_iter()
        .map(|(rec, ls)| {
            let pts = mean_band(&ls, train);
            let label = match (&rec, ls.len()) {
                (Some(r), n) if n > 1 => format!("{r} ({n} runs, min–max)"),
                _ => format!(
                    "{} seed {}",
                    rec.unwrap_or_else(|| ls[0].label()),
                    ls[0].seed().map_or("-".into(), |s| s.to_string())
                ),
            };
            (PlotLine { label, pts, runs: ls.len() }, ls[0].short_id())
        })
        .collect();
    // runs outside record folders with one variant and seed would share a label: the log's id tells them apart
    let labels: Vec<String> = lines.iter().map(|l| l.0.label.clone()).collect();
    for (l, id) in lines.iter_mut() {
        if labels.iter().filter(|x| **x == l.label).count() > 1 {
            l.label += &format!(" {id}");
        }
    }
    lines.into_iter().map(|l| l.0).collect()
}

type XOf = fn(&Pt) -> f64;

// matplotlib's tab10: distinct on white, unlike plotters' Palette99 whose third colour is a pale yellow
const COLORS: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

fn draw(lines: &[PlotLine], targets: &[f64], what: &str, svg: &mut String) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(svg, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels: [(&str, XOf); 2] = [("training time (s)", |p| p.0), ("step", |p| p.1)];
    if lines.iter().all(|l| l.pts.is_empty()) {
        return Err(format!("no {what} lines to plot").into());
    }
    for (area, (xdesc, x)) in root.split_evenly((1, 2)).iter().zip(panels) {
        let all = || lines.iter().flat_map(|l| l.pts.iter());
        let (x0, x1) = all().map(x).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        let (y0, y1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.3), b.max(p.4)));
        // the target is always in view: how far a run ends from it is the point
        let (y0, y1) = targets.iter().filter(|t| **t > 0.0).fold((y0, y1), |(a, b), &t| (a.min(t), b.max(t)));
        // log y: the step-0 loss (~10.8) would otherwise flatten the end of training, where runs differ.
        // plotters' own log ticks are powers of ten only, which leaves a 2..11 loss axis with one label
        let (y0, y1) = (y0 * 0.98, y1 * 1.02);
        let yticks = (-3..4)
            .flat_map(|k| [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0].map(|m| m * 10f64.powi(k)))
            .filter(|t| (y0..=y1).contains(t))
            .collect();
        let x1 = x1.max(x0 + 1.0);
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{what} vs {xdesc}"), ("sans-serif", 24))
            .margin(15)
            .margin_right(35) // room for the last x label
            .x_label_area_size(50)
            .y_label_area_size(65)
            .build_cartesian_2d(x0..x1, (y0..y1).log_scale().with_key_points(yticks))?;
        chart
            .configure_mesh()
            .x_desc(xdesc)
            .y_desc(what)
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            .light_line_style(BLACK.mix(0.04))
            .x_label_formatter(&|x| format!("{x}"))
            .y_label_formatter(&|y| format!("{y}"))
            .draw()?;
        for (i, l) in lines.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            if l.runs > 1 {
                let band = l.pts.iter().map(|p| (x(p), p.4)).chain(l.pts.iter().rev().map(|p| (x(p), p.3)));
                chart.draw_series(std::iter::once(Polygon::new(band.collect::<Vec<_>>(), color.mix(0.2).filled())))?;
            }
            let c = color.stroke_width(2);
            chart
                .draw_series(LineSeries::new(l.pts.iter().map(|p| (x(p), p.2)), c))?
                .label(&l.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        }
        for &t in targets.iter().filter(|t| **t > 0.0) {
            let style = BLACK.stroke_width(1);
            chart
                .draw_series(DashedLineSeries::new(vec![(x0, t), (x1, t)], 8, 5, style))?
                .label(format!("target {t}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

// --------------------------------------------------------------------------------------------------------------------
// Decode bench

// Cached greedy decoding of a [B,P] prompt for g tokens: (prefill ms, per-token ms, cache bytes at the end by its
// buffers, cache bytes the CUDA allocator gives back when it is dropped).
pub fn decode_timed(m: &Model, prompt: &Tensor, g: i64) -> (f64, Vec<f64>, i64, Option<i64>) {
    let dev = prompt.device();
    let mut cache = Cache::new(m.cfg.n_layer, prompt.size()[1] + g);
    tch::no_grad(|| {
        let t0 = Instant::now();
        let mut h = m.forward(prompt, Some(&mut cache), None);
        sync(dev);
        let prefill = t0.elapsed().as_secs_f64() * 1e3;
        let mut steps = vec![];
        for _ in 0..g {
            let t = Instant::now();
            let z = m.logits(&h.narrow(1, -1, 1));
            let next = z.narrow(2, 0, GPT2_VOCAB.min(m.cfg.vocab_size)).argmax(2, false);
            h = m.forward(&next, Some(&mut cache), None);
            sync(dev);
            steps.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (bytes, held) = (cache.bytes(), memory_allocated(dev));
        drop(cache);
        (prefill, steps, bytes, held.zip(memory_allocated(dev)).map(|(a, b)| a - b))
    })
}

pub fn cmd_bench_decode(a: &BenchDecodeArgs) -> Res<()> {
    if let Some(out) = &a.out {
        check_output(out, "--out", true)?;
    }
    let dev = pick_device(&a.device)?;
    let mut models = a.checkpoint.iter().map(|p| load_checkpoint(p, dev)).collect::<Res<Vec<_>>>()?;
    for m in models.iter_mut() {
        m.kernels = resolve_kernels(a.kernels, 0, dev, m.cfg.head_dim())?;
    }
    let (mut rows, t0) = (vec![], Instant::now());
    // Medians over the runs, so that one disturbed run does not move the figures.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // Each shape for every checkpoint in turn, so that a cut-short bench still compares the variants.
    for &b in &a.batch_sizes {
        for &p in &a.prompt_lens {
            for &g in &a.gen_lens {
                if p < 1 || g < 1 || b < 1 {
                    return Err(format!("sizes must be ≥ 1 (batch {b}, prompt {p}, gen {g})"));
                }
                for (m, path) in models.iter_mut().zip(&a.checkpoint) {
                    // Past the trained context the tokens are meaningless but the cost is real: longer RoPE tables.
                    if p + g > m.cos.size()[0] {
                        (m.cos, m.sin) = rope_tables(m.cfg.head_dim(), p + g, dev);
                    }
                    tch::manual_seed(0);
                    let prompt = Tensor::randint(GPT2_VOCAB.min(m.cfg.vocab_size), [b, p], (Kind::Int64, dev));
                    let _ = decode_timed(m, &prompt, g.min(64)); // warm-up: allocator, cuBLAS/SDPA kernel choice
                    let runs: Vec<(f64, Vec<f64>, i64, Option<i64>)> =
                        (0..a.repeats.max(1)).map(|_| decode_timed(m, &prompt, g)).collect();
                    let tps = median(runs.iter().map(|r| (b * g) as f64 / (r.1.iter().sum::<f64>() / 1e3)).collect());
                    let marks: Vec<usize> = (0..8)
                        .map(|i| i * (g as usize - 1) / 7)
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    let per_pos: Vec<Value> = marks
                        .iter()
                        .map(|&i| json!([p + i as i64, round4(median(runs.iter().map(|r| r.1[i]).collect()))]))
                        .collect();
                    let row = json!({"attn": m.cfg.attn, "device": format!("{dev:?}"), "gpu": gpu_name(dev), "batch": b,
                        "prompt_len": p, "gen_len": g,
                        "beyond_trained_context": p + g > m.cfg.seq_len,
                        "tokens_per_s": round4(tps), "prefill_ms": round4(median(runs.iter().map(|r| r.0).collect())),
                        "ms_per_token_at_position": per_pos, "cache_bytes": runs[0].2,
                        "cache_bytes_allocated": runs[0].3,
                        "cache_bytes_formula": cache_bytes_formula(&m.cfg, m.cdt, b, p + g),
                        "checkpoint": path.display().to_string(), "kernels": m.kernels,
                        "bench_elapsed_s": round4(t0.elapsed().as_secs_f64())});
                    println!("{row}");
                    rows.push(row);
                }
            }
        }
    }
    if let Some(out) = &a.out {
        write_atomic(out, serde_json::to_string_pretty(&rows).unwrap().as_bytes(), Existing::Replace)?;
    }
    Ok(())
}

pub fn cmd_stats(logs: &[PathBuf], vs: &[PathBuf]) -> Res<()> {
    let (a, b) = (whole_runs(parse_logs(logs)?), whole_runs(parse_logs(vs)?)); // all read before anything is printed
    let mut out = match a.len() {
        1 => single_report(&a[0])?,
        _ => stats_report(&stats(&a)?),
    };
    if !b.is_empty() {
        out += &compare_report(&a, &b)?;
    }
    println!("{out}");
    Ok(())
}

/// `train_gpt curves`: every log's loss curve, one row a step (CSV) or one object a log (JSON).
pub fn curves(logs: &[RunLog], json_out: bool) -> String {
    let num = |x: Option<f64>| x.filter(|x| x.is_finite());
    if json_out {
        let runs: Vec<Value> = logs
            .iter()
            .map(|l| {
                let pts: Vec<Value> = l
                    .curve()
                    .into_iter()
                    .map(|(s, (tl, vl, t))| {
                        json!({"step": s, "train_loss": tl, "val_loss": vl, "train_time_ms": num(Some(t))})
                    })
                    .collect();
                json!({"log": l.path, "record": l.record(), "variant": l.label(), "seed": l.seed(), "points": pts})
            })
            .collect();
        return serde_json::to_string_pretty(&runs).unwrap() + "\n";
    }
    // RFC 4180: a field with a comma, quote or line break is quoted, its quotes doubled
    let field = |x: &str| match x.contains([',', '"', '\n', '\r']) {
        true => format!("\"{}\"", x.replace('"', "\"\"")),
        false => x.to_string(),
    };
    let cell = |x: Option<f64>| num(x).map_or(String::new(), |x| x.to_string());
    let mut out = "log,record,variant,seed,step,train_loss,val_loss,train_time_ms\n".to_string();
    for l in logs {
        let head = [field(&l.path), field(&l.record().unwrap_or_default()), field(&l.label())].join(",");
        let seed = l.seed().map_or(String::new(), |s| s.to_string());
        for (s, (tl, vl, t)) in l.curve() {
            out += &format!("{head},{seed},{s},{},{},{}\n", cell(tl), cell(vl), cell(Some(t)));
        }
    }
    out
}

pub fn parse_logs(paths: &[PathBuf]) -> Res<Vec<RunLog>> {
    paths.iter().map(|p| parse_log(p)).collect()
}

/// The logs of whole runs, the ones that count in statistics and records; each one left out is named on stderr.
pub fn whole_runs(logs: Vec<RunLog>) -> Vec<RunLog> {
    let keep = |l: &RunLog| match l.not_a_whole_run() {
        Some(why) => {
            eprintln!("skipped {}: {why}", l.path);
            false
        }
        None => true,
    };
    logs.into_iter().filter(keep).collect()
}

// --------------------------------------------------------------------------------------------------------------------
// Races and reproductions: seeds of a config, each a `train` child of this executable (a crash ends one run, not the
// rest), into one folder that a rerun of the same command resumes; then a report made from the logs in it.

/// The keys `train` adds to TrainArgs in a logged config (`device` takes the place of TrainArgs' own, resolved).
const CONFIG_EXTRA_KEYS: [&str; 5] = ["variant", "track", "device", "compute_dtype", "world_size"];
/// Config keys that tell the runs of one config apart rather than the config.
const RUN_KEYS: [&str; 2] = ["seed", "log_dir"];
/// Nats of val loss that two mean curves may be apart at any matched step and still be one curve within noise. The
/// reproductions of 2026-12-06 (3 seeds, one H200) came within 0.016 (causal) and 0.0085 (tau) of their records'
/// means; the mean curves of CausalBaseline's seeds 0-2 and of its other three runs are 0.050 apart at step 700.
const SAME_CURVE_MAX_GAP: f64 = 0.05;
/// Two-sided p of final val loss above which a rerun's runs are the original's within noise.
const SAME_CURVE_MIN_P: f64 = 0.05;

/// The options of a (logged) config as `train` arguments: `--kebab-key=value` a key, true flags bare, nulls and false
/// flags left out; `=` keeps a negative value a value.
pub fn train_argv(cfg: &Map<String, Value>) -> Res<Vec<String>> {
    let arg = |(k, v): (&String, &Value)| {
        let flag = format!("--{}", k.replace('_', "-"));
        match v {
            Value::Null | Value::Bool(false) => Ok(None),
            Value::Bool(true) => Ok(Some(flag)),
            Value::String(s) => Ok(Some(format!("{flag}={s}"))),
            Value::Number(n) => Ok(Some(format!("{flag}={n}"))),
            _ => Err(format!("config key {k} holds {v}, not an option value; pass a log written by train_gpt")),
        }
    };
    Ok(cfg.iter().map(arg).collect::<Res<Vec<_>>>()?.into_iter().flatten().collect())
}

/// TrainArgs with no options given, as a config: the keys a logged config may hold, with this build's defaults.
fn train_defaults() -> Map<String, Value> {
    let m = Cli::command().get_matches_from(["train_gpt", "train"]);
    let a = TrainArgs::from_arg_matches(m.subcommand_matches("train").unwrap()).unwrap();
    serde_json::to_value(a).unwrap().as_object().unwrap().clone()
}

fn train_command(args: &[String]) -> Res<std::process::Command> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let mut c = std::process::Command::new(exe);
    c.arg("train").args(args);
    Ok(c)
}

/// The config a `train` run with these options logs (`train --print-config`): bad options are refused here, before
/// any run, with train's own line.
fn resolved_config(args: &[String]) -> Res<Map<String, Value>> {
    let out = train_command(args)?.arg("--print-config").output().map_err(|e| format!("cannot start train: {e}"))?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        let why = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        return Err(why.trim_start_matches("error: ").to_string());
    }
    stdout
        .lines()
        .find_map(|l| serde_json::from_str(l.strip_prefix("config: ")?).ok())
        .ok_or_else(|| format!("train --print-config gave no config line: {}", stdout.trim()))
}

/// A config without the keys of one run (seed, log_dir).
fn config_of_runs(cfg: &Map<String, Value>) -> Map<String, Value> {
    cfg.iter().filter(|(k, _)| !RUN_KEYS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The whole runs' logs in a folder; files that are not logs (race.txt) and cut runs are passed over.
fn whole_logs_in(dir: &Path) -> Vec<RunLog> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_log_file(p)).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|p| parse_log(p).ok()).filter(|l| l.not_a_whole_run().is_none()).collect()
}

/// Of `logs`, the first of each seed whose config is `want` but for seed and log_dir.
fn runs_of(logs: &[RunLog], want: &Map<String, Value>, seeds: &[i64]) -> BTreeMap<i64, RunLog> {
    let want = config_of_runs(want);
    let mut runs = BTreeMap::new();
    for l in logs.iter().filter(|l| config_of_runs(&l.config) == want) {
        if let Some(s) = l.seed().filter(|s| seeds.contains(s)) {
            runs.entry(s).or_insert_with(|| l.clone());
        }
    }
    runs
}

/// Runs `train <options> --seed=S --log-dir=DIR` for each (name, options, config, seed) in turn, but those whose whole
/// log `dir` already holds; a run that fails is named and the others go on. Returns the failed runs.
fn run_seeds(dir: &Path, jobs: &[(String, Vec<String>, Map<String, Value>, i64)]) -> Res<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}; pass a writable --out", dir.display()))?;
    let done = whole_logs_in(dir);
    let mut failed = vec![];
    for (i, (name, opts, want, seed)) in jobs.iter().enumerate() {
        let what = format!("run {}/{}: {name} seed {seed}", i + 1, jobs.len());
        if let Some(l) = runs_of(&done, want, &[*seed]).get(seed) {
            println!("{what}: done already ({}), skipped", l.path);
            continue;
        }
        // a log of this variant and seed under other options is not this run: say which options, so that a race
        // resumed on another box (another device, preset) does not start anew unnoticed
        let (want_runs, same_run) = (config_of_runs(want), |l: &&RunLog| l.seed() == Some(*seed));
        if let Some(l) = done.iter().filter(same_run).find(|l| l.config.get("attn") == want.get("attn")) {
            let had = config_of_runs(&l.config);
            let keys: Vec<&String> = want_runs
                .keys()
                .chain(had.keys())
                .filter(|k| had.get(*k) != want_runs.get(*k))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let shown: Vec<String> = keys
                .iter()
                .take(3)
                .map(|k| {
                    format!(
                        "{k}: {} -> {}",
                        had.get(*k).unwrap_or(&Value::Null),
                        want_runs.get(*k).unwrap_or(&Value::Null)
                    )
                })
                .collect();
            let more = if keys.len() > 3 { format!(" and {} more", keys.len() - 3) } else { String::new() };
            println!("{what}: {} ran it with other options ({}{more}); running it anew", l.path, shown.join(", "));
        }
        let args = [opts.clone(), vec![format!("--seed={seed}"), format!("--log-dir={}", dir.display())]].concat();
        println!("{what}: train {}", args.join(" "));
        let st = train_command(&args)?.status().map_err(|e| format!("cannot start train: {e}"))?;
        if !st.success() {
            eprintln!("{what}: failed ({st}); going on");
            failed.push(format!("{name} seed {seed}"));
        }
    }
    Ok(failed)
}

/// The output folder: --out, or logs/<what>-<local date>-<time>; made by the first run.
fn out_dir(out: Option<PathBuf>, what: &str) -> PathBuf {
    out.unwrap_or_else(|| format!("logs/{what}-{}", chrono::Local::now().format("%Y%m%d-%H%M%S")).into())
}

/// `train_gpt race A B ... [--seeds N] [--out DIR] [train options]`.
pub fn cmd_race(a: &RaceArgs, m: &ArgMatches) -> Res<()> {
    let names = attention_names();
    for (i, v) in a.variants.iter().enumerate() {
        if !names.contains(&v.as_str()) {
            return Err(format!("race: no variant {v:?}; pass --attn values: {}", names.join(", ")));
        }
        if a.variants[..i].contains(v) {
            return Err(format!("race: {v} is named twice; name each variant once"));
        }
    }
    let given = |id: &str| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    for (id, why) in [
        ("attn", "the variant names set it"),
        ("seed", "--seeds N runs seeds 0..N"),
        ("log_dir", "--out DIR sets it"),
        ("save_checkpoint", "a race keeps no weights; train the run whose weights you want"),
        ("overwrite", "a race keeps no weights"),
        ("print_config", "a race runs"),
        ("resume", "a race starts its runs"),
        ("checkpoint_every", "its runs would share one --checkpoint-dir; checkpoint the run you want to keep"),
    ] {
        if given(id) {
            return Err(format!("race: --{} is not a race option ({why}); leave it out", id.replace('_', "-")));
        }
    }
    // the options given, as train takes them: the same conversion as a logged config's
    let mut given_opts = serde_json::to_value(&a.train).unwrap().as_object().unwrap().clone();
    given_opts.retain(|k, _| given(k));
    let opts = train_argv(&given_opts)?;
    let dir = out_dir(a.out.clone(), "race");
    let mut variants = vec![];
    for v in &a.variants {
        let vopts = [vec![format!("--attn={v}")], opts.clone()].concat();
        let want = resolved_config(&[vopts.clone(), vec![format!("--log-dir={}", dir.display())]].concat())
            .map_err(|e| format!("race: {v}: {e}"))?;
        variants.push((v.clone(), vopts, want));
    }
    let seeds: Vec<i64> = (0..a.seeds).collect();
    let jobs: Vec<_> = seeds
        .iter()
        .flat_map(|&s| variants.iter().map(move |(v, o, w)| (v.clone(), o.clone(), w.clone(), s)))
        .collect();
    let failed = run_seeds(&dir, &jobs)?;
    let logs = whole_logs_in(&dir);
    let groups: Vec<(String, Vec<RunLog>)> =
        variants.iter().map(|(v, _, w)| (v.clone(), runs_of(&logs, w, &seeds).into_values().collect())).collect();
    let report = race_report(&dir, a.seeds, &groups)?;
    let all: Vec<RunLog> = groups.iter().flat_map(|g| g.1.clone()).collect();
    if !all.is_empty() {
        plot_svg(&all, &dir.join("race.svg"), false, |l| Some(l.label()))?;
    }
    write_atomic(&dir.join("race.txt"), report.as_bytes(), Existing::Replace)?;
    print!("{report}");
    println!("wrote {} and {}", dir.join("race.txt").display(), dir.join("race.svg").display());
    match failed.len() {
        0 => Ok(()),
        n => Err(format!(
            "race: {n} of {} runs failed ({}); the report leaves them out; rerun the same command to retry them",
            jobs.len(),
            failed.join(", ")
        )),
    }
}

/// Each variant's runs, time-to-target, final val loss and ms/step; each against the first (compare_report: Welch's
/// t-test of final val loss and time, its winner); then the race's winner by the speedrun's rule: every run reached the
/// target, soonest on average; where no variant's runs all did, the lowest mean final val loss.
pub fn race_report(dir: &Path, seeds: i64, groups: &[(String, Vec<RunLog>)]) -> Res<String> {
    let names: Vec<&str> = groups.iter().map(|g| g.0.as_str()).collect();
    let mut out = format!("race: {} in {}, seeds 0..{seeds} of each\n", names.join(", "), dir.display());
    for (v, logs) in groups {
        out += &match logs.is_empty() {
            true => format!("{v}: no whole runs\n"),
            false => format!(
                "{v}: runs {} time_to_target_s {} final_val_loss {} ms_per_step {}\n",
                logs.len(),
                time_cell(logs),
                pm_of(logs, RunLog::final_val_loss, 4),
                pm_of(logs, RunLog::ms_per_step, 1)
            ),
        };
    }
    let (first, base) = (&groups[0].0, &groups[0].1);
    for (v, logs) in &groups[1..] {
        out += &match (base.len(), logs.len()) {
            (0, _) | (_, 0) => format!("{v} vs {first}: no test: a side has no whole runs\n"),
            (1, 1) => format!("{v} vs {first}: no test: one run a side (race --seeds 2 or more)\n"),
            _ => compare_report(logs, base)? + "\n",
        };
    }
    let ranked: Vec<(&String, bool, f64)> = groups
        .iter()
        .filter(|g| !g.1.is_empty())
        .map(|(v, logs)| {
            let reached = logs.iter().all(|l| l.time_to_target_ms().is_some());
            let by: Metric = if reached { RunLog::time_to_target_ms } else { RunLog::final_val_loss };
            (v, reached, mean_std(&logs.iter().filter_map(by).collect::<Vec<_>>()).0)
        })
        .collect();
    out += &match ranked.iter().min_by(|a, b| b.1.cmp(&a.1).then(a.2.total_cmp(&b.2))) {
        None => "race_winner: none: no whole runs\n".into(),
        Some((v, true, ms)) => {
            format!("race_winner: {v}: every run reached the target, in {:.1} s on average\n", ms / 1e3)
        }
        Some((v, false, loss)) => format!(
            "race_winner: {v}: lowest mean final val loss {loss:.4} (no variant reached the target in every run)\n"
        ),
    };
    Ok(out)
}

/// `train_gpt reproduce LOG|RECORD_DIR [--seeds N] [--out DIR] [--allow-source-diff]`.
pub fn cmd_reproduce(path: &Path, seeds: Option<i64>, out: Option<PathBuf>, allow_source_diff: bool) -> Res<()> {
    let p = path.display();
    // a folder's files that are not logs (race.txt, reproduce.txt) are named and passed over
    let logs = match path.is_dir() {
        true => {
            let rd = std::fs::read_dir(path).map_err(|e| format!("{p}: {e}; pass a log or a record folder"))?;
            let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|f| is_log_file(f)).collect();
            v.sort();
            let parsed = v.iter().map(|f| parse_log(f).inspect_err(|e| eprintln!("skipped {e}")));
            parsed.filter_map(Result::ok).collect()
        }
        false => vec![parse_log(path)?],
    };
    let orig = whole_runs(logs);
    if orig.is_empty() {
        return Err(format!("{p}: no whole run's log there; pass a log or a record folder of logs"));
    }
    // the code that ran: this build's train_gpt.rs, or a rerun is not a reproduction
    let sha = |s: &str| format!("{:x}", Sha256::digest(format!("{}\n", s.trim_end())));
    let ours = sha(SOURCE);
    let mut source = format!("source: train_gpt.rs as this build's (sha256 {ours})\n");
    for l in &orig {
        let theirs = sha(&embedded_files(&l.source)[0].1);
        if theirs != ours {
            if !allow_source_diff {
                return Err(format!(
                    "{}: its train_gpt.rs (sha256 {theirs}) is not this build's (sha256 {ours}); build the log's \
                     (train_gpt source LOG --out DIR) or pass --allow-source-diff",
                    l.path
                ));
            }
            source = format!("source: DIFFERS (--allow-source-diff): {} sha256 {theirs}, this build {ours}\n", l.path);
        }
    }
    let cfg = config_of_runs(&orig[0].config);
    if let Some(l) = orig.iter().find(|l| config_of_runs(&l.config) != cfg) {
        return Err(format!(
            "{}: its config is not {}'s; pass one log or a folder of one config",
            l.path, orig[0].path
        ));
    }
    let defaults = train_defaults();
    if let Some(k) = cfg.keys().find(|k| !defaults.contains_key(*k) && !CONFIG_EXTRA_KEYS.contains(&k.as_str())) {
        return Err(format!(
            "{p}: its config holds {k:?}, not an option of this build; reproduce it with the log's build"
        ));
    }
    let absent: Vec<&String> = defaults.keys().filter(|k| !orig[0].config.contains_key(*k)).collect();
    // the logged options; the device as resolved (Cpu, Cuda(0)) back to an option (several ranks take cuda too)
    let mut opts: Map<String, Value> =
        cfg.iter().filter(|(k, _)| defaults.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
    if let Some(d) = cfg.get("device").and_then(Value::as_str) {
        opts.insert("device".into(), json!(if d.starts_with("Cuda") { "cuda".into() } else { d.to_lowercase() }));
    }
    let mut notes = String::new();
    if let Some(ck) = opts.remove("save_checkpoint").filter(|v| !v.is_null()) {
        notes += &format!("save_checkpoint: left out ({ck}): the rerun keeps no weights\n");
    }
    // a rerun starts at step 0 and writes no checkpoints (whose folder may hold the original's)
    if let Some(r) = opts.remove("resume").filter(|v| !v.is_null()) {
        notes += &format!("resume: left out ({r}): the rerun starts at step 0\n");
    }
    for k in ["checkpoint_every", "checkpoint_dir", "keep_checkpoints"] {
        opts.remove(k);
    }
    let mut seed_list: Vec<i64> = orig.iter().filter_map(RunLog::seed).collect();
    (seed_list.sort(), seed_list.dedup());
    let seed_list: Vec<i64> = match (seeds, orig.len()) {
        (Some(n), 1) => (0..n).collect(),
        (Some(n), _) => seed_list.into_iter().take(n as usize).collect(),
        (None, _) => seed_list,
    };
    let opts = train_argv(&opts)?;
    let dir = out_dir(out, "reproduce");
    let want = resolved_config(&[opts.clone(), vec![format!("--log-dir={}", dir.display())]].concat())
        .map_err(|e| format!("reproduce: {e}"))?;
    let jobs: Vec<_> = seed_list.iter().map(|&s| (orig[0].variant(), opts.clone(), want.clone(), s)).collect();
    let failed = run_seeds(&dir, &jobs)?;
    let new: Vec<RunLog> = runs_of(&whole_logs_in(&dir), &want, &seed_list).into_values().collect();
    let old: Vec<RunLog> = match orig.len() {
        1 => orig.clone(),
        _ => orig.iter().filter(|l| l.seed().is_some_and(|s| seed_list.contains(&s))).cloned().collect(),
    };
    let mut report =
        format!("reproduce: {p} ({} runs) in {} (seeds {seed_list:?})\n{source}", old.len(), dir.display());
    report += &match absent.is_empty() {
        true => "absent_options: none\n".to_string(),
        false => format!(
            "absent_options: {} (not in the logged config: this build's defaults)\n",
            absent.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
        ),
    };
    let changed: Vec<String> = config_of_runs(&want)
        .iter()
        .filter(|(k, v)| cfg.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: {} -> {v}", cfg.get(k).map_or("-".into(), Value::to_string)))
        .collect();
    report += &match changed.is_empty() {
        true => "config: as logged\n".to_string(),
        false => format!("config: differs from the logged one: {}\n", changed.join(", ")),
    };
    report += &notes;
    report += &reproduce_report(&old, &new)?;
    write_atomic(&dir.join("reproduce.txt"), report.as_bytes(), Existing::Replace)?;
    print!("{report}");
    println!("wrote {}", dir.join("reproduce.txt").display());
    match failed.len() {
        0 => Ok(()),
        n => Err(format!(
            "reproduce: {n} of {} runs failed ({}); rerun the same command to retry them",
            jobs.len(),
            failed.join(", ")
        )),
    }
}

/// The rerun against the original: final val loss each and the two-sided test of their difference, time-to-target
/// each, the largest val-loss gap between the mean curves at matched steps, and the verdict: the same curve within
/// noise when p > SAME_CURVE_MIN_P (no test with one run a side) and the gap is at most SAME_CURVE_MAX_GAP.
pub fn reproduce_report(old: &[RunLog], new: &[RunLog]) -> Res<String> {
    if new.is_empty() {
        return Ok("verdict: none: no whole rerun\n".into());
    }
    let loss = |ls: &[RunLog]| ls.iter().filter_map(RunLog::final_val_loss).collect::<Vec<f64>>();
    let mut out = format!(
        "final_val_loss: original {} rerun {}\n",
        pm_of(old, RunLog::final_val_loss, 4),
        pm_of(new, RunLog::final_val_loss, 4)
    );
    let p = match (old.len(), new.len()) {
        (1, 1) => {
            out += "final_val_loss_test: none: one run a side\n";
            None
        }
        _ => {
            let (test, _, df, p) = two_sided(&loss(old), &loss(new))?;
            out += &format!("final_val_loss_test: {test} df {df:.2} p_two_sided {}\n", fmt_p(p));
            Some(p)
        }
    };
    out += &format!("time_to_target_s: original {} rerun {}\n", time_cell(old), time_cell(new));
    let (a, b) = (mean_band(&old.iter().collect::<Vec<_>>(), false), mean_band(&new.iter().collect::<Vec<_>>(), false));
    let bv: BTreeMap<u64, f64> = b.iter().map(|p| (p.1 as u64, p.2)).collect();
    let gaps: Vec<(f64, u64)> =
        a.iter().filter_map(|p| bv.get(&(p.1 as u64)).map(|y| ((y - p.2).abs(), p.1 as u64))).collect();
    // the largest gap, the first step of a tie
    let Some(&(gap, at)) = gaps.iter().max_by(|x, y| x.0.total_cmp(&y.0).then(y.1.cmp(&x.1))) else {
        return Ok(out + "verdict: not the same curve: no val loss at matched steps\n");
    };
    out += &format!(
        "val_loss_max_gap: {gap:.4} at step {at} ({} matched steps, mean curve against mean curve)\n",
        gaps.len()
    );
    let rule =
        format!("p_two_sided > {SAME_CURVE_MIN_P} (no test with one run a side) and max gap ≤ {SAME_CURVE_MAX_GAP}");
    // which half of the rule failed, by its numbers
    let mut failed = vec![];
    if let Some(p) = p.filter(|&p| p <= SAME_CURVE_MIN_P) {
        failed.push(format!("p_two_sided {p:.4} ≤ {SAME_CURVE_MIN_P}"));
    }
    if gap > SAME_CURVE_MAX_GAP {
        failed.push(format!("max gap {gap:.4} > {SAME_CURVE_MAX_GAP}"));
    }
    out += &match failed.is_empty() {
        true => format!("verdict: same curve within noise: {rule}\n"),
        false => format!("verdict: not the same curve: {} (the rule: {rule})\n", failed.join(", ")),
    };
    if p.is_none() {
        // two fused runs of one seed and one build drift apart mid-run (docs/racing.md): one run a side says little
        out += "note: one run a side: a single run's gap holds the kernels' run-to-run noise; pass --seeds 3\n";
    }
    Ok(out)
}

#[cfg(test)]
#[path = "tests/unit/records.rs"]
mod tests;
