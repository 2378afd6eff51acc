// Unit tests of train_gpt.rs, with its private items; command-line tests are in tests/cli.rs.
use super::*;

// Tests: the mean loss over (x, y) and every parameter's gradient, from zeroed gradients, through the training
// path (`micro` rows at a time, the head `head_chunk` rows at a time; 0: all at once).
impl Model {
    fn loss_and_grads(&mut self, x: &Tensor, y: &Tensor, micro: i64, head_chunk: i64) -> (f64, Vec<Tensor>) {
        for (_, p) in self.params.iter_mut() {
            p.zero_grad();
        }
        let loss = backward_micro_batches(self, x, y, micro, head_chunk).double_value(&[]);
        (loss, self.params.iter().map(|(_, p)| p.grad().copy()).collect())
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("train_gpt-unit-{}", std::process::id()));
    fs::create_dir_all(&d).unwrap();
    d.join(name)
}

// (variant, n_kv_head): every variant with full heads, and grouped-query attention where it applies
const VARIANTS: [(&str, i64); 12] = [
    ("causal", 0),
    ("sliding", 0),
    ("tau", 0),
    ("tau-lt", 0),
    ("tau-full", 0),
    ("tau-multi", 0),
    ("tau-bias", 0),
    ("causal", 1),
    ("sliding", 1),
    ("tau", 1),
    ("tau-multi", 1),
    ("tau-bias", 1),
];

#[test]
fn the_variant_list_is_every_attention() {
    let mut listed: Vec<&str> = VARIANTS.iter().map(|(a, _)| *a).collect();
    listed.sort();
    listed.dedup();
    let mut all = attention_names();
    all.sort();
    assert_eq!(listed, all, "a new variant joins VARIANTS, and so every test below");
}

// Autograd's gradient of the scalar f(inputs) against central differences (steps of ±1e-6), at every `stride`-th
// element of each input: |numeric − analytic| < tol·(1 + |analytic|). The inputs are f64 leaves that need gradients.
fn assert_gradients_match_finite_differences(
    what: &str,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Tensor,
    stride: usize,
    tol: f64,
) {
    f(inputs).backward();
    for which in 0..inputs.len() {
        let analytic = Vec::<f64>::try_from(inputs[which].grad().flatten(0, -1)).unwrap();
        for (e, a) in analytic.iter().enumerate().step_by(stride) {
            let at = |delta: f64| {
                tch::no_grad(|| {
                    let xs: Vec<Tensor> = inputs.iter().map(|x| x.detach().copy()).collect();
                    let _ = xs[which].view([-1]).get(e as i64).g_add_scalar_(delta);
                    f(&xs).double_value(&[])
                })
            };
            let numeric = (at(1e-6) - at(-1e-6)) / 2e-6;
            assert!(
                (numeric - a).abs() < tol * (1.0 + a.abs()),
                "{what}: input {which} elem {e}: analytic {a} numeric {numeric}"
            );
        }
    }
}

// One layer's attention output through a random probe, and its gradients by autograd and by central differences,
// for q, k, v and the variant's trained layer tensors, all in f64.
#[test]
fn every_attention_s_gradients_match_finite_differences() {
    for name in attention_names() {
        let mut m = small(name, 64);
        m.lap = m.lap.to_kind(Kind::Double);
        let trained: Vec<String> = m
            .attn
            .layer_tensors(&m.cfg)
            .iter()
            .filter(|t| t.trained)
            .map(|t| format!("blocks.0.attn.{}", t.name))
            .collect();
        for (n, p) in m.params.iter_mut() {
            if trained.contains(n) {
                // off their constant init, so that heads differ
                *p = (p.to_kind(Kind::Double) * (Tensor::rand_like(p).to_kind(Kind::Double) * 0.5 + 0.75))
                    .detach()
                    .set_requires_grad(true);
            }
        }
        let opts = (Kind::Double, Device::Cpu);
        let (b, h, t, d) = (1, m.cfg.n_head, 10, m.cfg.head_dim());
        let mut inputs: Vec<Tensor> =
            (0..3).map(|_| Tensor::randn([b, h, t, d], opts).set_requires_grad(true)).collect();
        inputs.extend(trained.iter().map(|n| m.p(n).shallow_clone()));
        let probe = Tensor::randn([b, h, t, d], opts);
        // the model with these inputs' layer tensors
        let f = |x: &[Tensor]| {
            let mut m2 = Model {
                params: m.params.iter().map(|(n, p)| (n.clone(), p.shallow_clone())).collect(),
                ..small(name, 64)
            };
            m2.lap = m.lap.shallow_clone();
            for (n, t) in trained.iter().zip(&x[3..]) {
                m2.params.iter_mut().find(|(pn, _)| pn == n).unwrap().1 = t.shallow_clone();
            }
            (m2.attn.attend(&m2, 0, &x[0], &x[1], &x[2], None, None) * &probe).sum(Kind::Double)
        };
        assert_gradients_match_finite_differences(name, &inputs, f, 3, 1e-5);
    }
}

#[test]
fn sliding_attention_sees_only_its_window() {
    let m = small("sliding", 64);
    let opts = (Kind::Float, Device::Cpu);
    let (q, k, v) =
        (Tensor::randn([1, 2, 12, 16], opts), Tensor::randn([1, 2, 12, 16], opts), Tensor::randn([1, 2, 12, 16], opts));
    let y = m.attn.attend(&m, 0, &q, &k, &v, None, None);
    let j = 3; // change key and value 3: only queries 3..3+window see it
    let (k2, v2) = (k.copy(), v.copy());
    let _ = k2.narrow(2, j, 1).g_add_scalar_(1.0);
    let _ = v2.narrow(2, j, 1).g_add_scalar_(1.0);
    let y2 = m.attn.attend(&m, 0, &q, &k2, &v2, None, None);
    let moved: Vec<bool> =
        (0..12).map(|i| (y.narrow(2, i, 1) - y2.narrow(2, i, 1)).abs().max().double_value(&[]) > 1e-6).collect();
    let want: Vec<bool> = (0..12).map(|i| i >= j && i < j + m.cfg.window).collect();
    assert_eq!(moved, want);
}

#[test]
fn tau_bias_with_alpha_zero_is_causal_attention() {
    // tau-bias with causal's weights (copied: tests share torch's generator across threads)
    let c = small("causal", 512);
    let mut tb = small("tau-bias", 512);
    tch::no_grad(|| {
        for (n, p) in tb.params.iter_mut() {
            match c.params.iter().find(|(cn, _)| cn == n) {
                Some((_, w)) => p.copy_(w),
                None => {
                    let _ = p.zero_(); // α
                }
            };
        }
    });
    let idx = Tensor::randint(512, [2, 16], (Kind::Int64, Device::Cpu));
    let d = tch::no_grad(|| (c.hidden(&idx, None) - tb.hidden(&idx, None)).abs().max().double_value(&[]));
    assert!(d < 1e-5, "{d}");
    let alpha0 = c.cfg.inv_temp_init;
    tch::no_grad(|| {
        tb.params.iter_mut().filter(|(n, _)| n.ends_with(".alpha")).for_each(|(_, p)| {
            let _ = p.fill_(alpha0);
        })
    });
    let d = tch::no_grad(|| (tb.hidden(&idx, None) - c.hidden(&idx, None)).abs().max().double_value(&[]));
    assert!(d > 1e-3, "α at init moves the output ({d})");
}

#[test]
fn tau_multi_with_one_band_is_tau_lt() {
    let lt = small("tau-lt", 512);
    let mut cfg = lt.cfg.clone();
    (cfg.attn, cfg.bands) = ("tau-multi".into(), 1);
    tch::manual_seed(0);
    let mut one = Model::new(cfg, Device::Cpu, Kind::Float, Some(lt.lap.copy()));
    tch::no_grad(|| {
        one.params.iter_mut().zip(&lt.params).for_each(|((_, a), (_, b))| {
            a.copy_(b);
        })
    });
    let idx = Tensor::randint(512, [2, 16], (Kind::Int64, Device::Cpu));
    let d = tch::no_grad(|| (one.hidden(&idx, None) - lt.hidden(&idx, None)).abs().max().double_value(&[]));
    assert!(d < 1e-5, "{d}");
}

#[test]
fn spectral_bands_add_up_to_l_and_split_its_spectrum() {
    let l = chain_laplacian(16);
    for r in [1, 3, 4] {
        let b = bands_of(&l, r);
        assert_eq!(b.size(), if r == 1 { vec![16, 16] } else { vec![r, 16, 16] });
        let sum = if r == 1 { b.copy() } else { b.sum_dim_intlist(0, false, Kind::Float) };
        assert!(max_abs(&(sum - &l)) < 1e-5, "{r} bands");
        if r > 1 {
            // each band is PSD with rank its share of the 16 eigenvalues (the first band holds λ = 0)
            for i in 0..r {
                let e = eig(&b.get(i));
                assert!(e.iter().all(|&x| x > -1e-5), "band {i}: {e:?}");
                let rank = e.iter().filter(|&&x| x > 1e-4).count() as i64;
                let share = if i + 1 == r { 16 - (r - 1) * (16 / r) } else { 16 / r };
                assert_eq!(rank, share - (i == 0) as i64, "band {i} of {r}");
            }
        }
    }
}

#[test]
fn tau_full_shares_one_lambda_of_the_whole_vector_across_heads() {
    let m = small("tau-full", 512);
    let x = Tensor::randn([2, 2, 5, 16], (Kind::Float, Device::Cpu));
    let (_, lam) = m.attn.energies(&m, &x, &m.tau);
    assert_eq!(lam.size(), [2, 1, 5]);
    let whole = x.transpose(1, 2).reshape([2, 5, 32]);
    let (_, by_hand) = taumode(&whole, &chain_laplacian(32), m.tau[0]);
    assert!(max_abs(&(lam.squeeze_dim(1) - by_hand)) < 1e-6);
}

#[test]
fn a_model_with_chunked_tau_attention_is_the_same_model() {
    for attn in ["tau", "tau-lt"] {
        let mut m = small(attn, 512);
        let (x, y) = (
            Tensor::randint(512, [2, 16], (Kind::Int64, Device::Cpu)),
            Tensor::randint(512, [2, 16], (Kind::Int64, Device::Cpu)),
        );
        let mut run = |chunk: i64| {
            m.tau_chunk = chunk;
            m.loss_and_grads(&x, &y, 0, 0)
        };
        let (l0, g0) = run(0);
        let (l1, g1) = run(5);
        assert!((l0 - l1).abs() < 1e-5, "{attn}: {l0} vs {l1}");
        for (a, b) in g0.iter().zip(&g1) {
            assert!((a - b).abs().max().double_value(&[]) < 1e-5 * (1.0 + a.abs().max().double_value(&[])), "{attn}");
        }
    }
}

// A config of the given shape; the variants' own options: window 6, 2 bands, temperature 0.5, inverse temperature 20.
fn shape(attn: &str, [n_layer, n_head, n_kv_head, n_embd, seq_len, vocab_size]: [i64; 6]) -> ModelCfg {
    let c = ModelCfg {
        n_layer,
        n_head,
        n_kv_head,
        n_embd,
        seq_len,
        vocab_size,
        attn: attn.into(),
        window: 6,
        bands: 2,
        tau_temp: 0.5,
        inv_temp_init: 20.0,
    };
    c.check().unwrap();
    c
}

fn small(attn: &str, vocab: i64) -> Model {
    small_kv(attn, vocab, 0)
}

// n_kv_head 1 of 2 query heads: grouped-query attention
fn small_kv(attn: &str, vocab: i64, n_kv_head: i64) -> Model {
    tch::manual_seed(0);
    let cfg = shape(attn, [2, 2, n_kv_head, 32, 16, vocab]);
    let lap = chain_for(&cfg);
    let mut m = Model::new(cfg, Device::Cpu, Kind::Float, lap);
    // Zero-initialised output projections would hide attention entirely at init: perturb them for the tests.
    for (n, p) in m.params.iter_mut() {
        if n.ends_with(".o") || n.ends_with(".proj") {
            tch::no_grad(|| p.copy_(&(p.randn_like() * 0.05)));
        }
    }
    m
}

fn args(list: &[&str]) -> TrainArgs {
    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        a: TrainArgs,
    }
    P::parse_from(std::iter::once("t").chain(list.iter().copied())).a
}

fn eig(l: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&l.to_kind(Kind::Double).linalg_eigvalsh("L")).unwrap()
}

fn decode(ids: &[u16]) -> String {
    tokenizer().decode(&ids.iter().map(|&x| x as u32).collect::<Vec<_>>()).unwrap()
}

// Documents of a split, read back from its shards: split at EOT, decoded.
fn read_docs(dir: &Path, split: &str) -> Vec<String> {
    let toks: Vec<u16> = shard_paths(dir, split).iter().flat_map(|p| read_shard(p).unwrap()).collect();
    assert_eq!(toks[0], EOT, "every document starts with EOT");
    toks.split(|&t| t == EOT).skip(1).map(decode).collect()
}

#[test]
fn prepare_round_trip_plain_text() {
    let src = tmp("txt");
    fs::create_dir_all(&src).unwrap();
    let books = [
        "Call me Ishmael.\r\n\r\nSome years ago—never mind how long precisely—\r\n".repeat(40),
        "Alice was beginning to get very tired.\n\n".repeat(50),
    ];
    for (i, b) in books.iter().enumerate() {
        fs::write(src.join(format!("{i}.txt")), b).unwrap();
    }
    let out = tmp("txt-out");
    cmd_prepare(&PrepareArgs { input: src.clone(), out: out.clone() }).unwrap();
    let (train, val) = (read_docs(&out, "train"), read_docs(&out, "val"));
    assert_eq!((train.len(), val.len()), (2, 2));
    for i in 0..2 {
        assert_eq!(format!("{}{}", train[i], val[i]), books[i], "train + val part of a file is the file");
        assert!(val[i].len() as f64 <= books[i].len() as f64 * 0.06 && !val[i].is_empty(), "val is the last ~5%");
        assert!(val[i].starts_with("\r\n\r\n") || val[i].starts_with("\n\n"), "the cut falls on a blank line");
    }
    let again = tmp("txt-out2");
    cmd_prepare(&PrepareArgs { input: src, out: again.clone() }).unwrap();
    assert_eq!(
        fs::read(out.join("train_000000.bin")).unwrap(),
        fs::read(again.join("train_000000.bin")).unwrap(),
        "deterministic"
    );
    let e = cmd_prepare(&PrepareArgs { input: tmp("txt"), out }).unwrap_err();
    assert!(e.contains("already holds shards"), "{e}");
}

#[test]
fn prepare_round_trip_jsonl_zst_keeps_split() {
    let docs = [
        ("a.c", "train", "int main(void) { return 0; }\n"),
        ("b.c", "val", "/* é ü */ static int x;\n"),
        ("c.h", "train", "#define N 3\n"),
    ];
    let jsonl: String =
        docs.iter().map(|(p, s, t)| format!("{}\n", json!({"path": p, "split": s, "text": t}))).collect();
    let path = tmp("docs.jsonl.zst");
    fs::write(&path, zstd::encode_all(jsonl.as_bytes(), 3).unwrap()).unwrap();
    let out = tmp("jsonl-out");
    cmd_prepare(&PrepareArgs { input: path, out: out.clone() }).unwrap();
    assert_eq!(read_docs(&out, "train"), vec![docs[0].2, docs[2].2]);
    assert_eq!(read_docs(&out, "val"), vec![docs[1].2]);
    let bad = tmp("bad.jsonl");
    fs::write(&bad, "{\"path\": \"x\", \"split\": \"test\", \"text\": \"y\"}\n").unwrap();
    let e = cmd_prepare(&PrepareArgs { input: bad, out: tmp("bad-out") }).unwrap_err();
    assert!(e.contains("split \"test\"") && !e.contains('\n'), "{e}");
    let e = cmd_prepare(&PrepareArgs { input: tmp("corrupt.zst"), out: tmp("c-out") }).unwrap_err();
    assert!(e.contains("corrupt.zst") && !e.contains('\n'), "{e}");
}

#[test]
fn shard_header_errors() {
    let good = tmp("good.bin");
    write_shard(&good, &[EOT, 1, 2, 3]).unwrap();
    assert_eq!(read_shard(&good).unwrap(), vec![EOT, 1, 2, 3]);
    let bytes = fs::read(&good).unwrap();
    let variant = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = bytes.clone();
        f(&mut b);
        let p = tmp(name);
        fs::write(&p, b).unwrap();
        let e = read_shard(&p).unwrap_err();
        assert!(!e.contains('\n') && e.contains("prepare"), "{e}");
        e
    };
    assert!(variant("magic.bin", &|b| b[0] ^= 1).contains("magic"));
    assert!(variant("version.bin", &|b| b[4] = 7).contains("version 7"));
    assert!(variant("short.bin", &|b| b.truncate(1030)).contains("truncated"));
    assert!(variant("long.bin", &|b| b.extend_from_slice(&[0, 0])).contains("truncated or corrupt"));
    assert!(variant("tiny.bin", &|b| b.truncate(10)).contains("header"));
    assert!(read_shard(&tmp("absent.bin")).unwrap_err().contains("prepare"));
}

#[test]
fn held_out_split_is_deterministic_and_cuts_at_blank_line() {
    let text = "para one.\n\npara two is longer.\n\n".repeat(30);
    let (a, b) = split_held_out(&text);
    assert_eq!(format!("{a}{b}"), text);
    assert!(b.starts_with("\n\n") && a.len() >= (text.len() as f64 * 0.95) as usize);
    assert_eq!(split_held_out(&text), (a, b));
}

#[test]
fn forward_shapes() {
    for (attn, kv) in VARIANTS {
        let m = small_kv(attn, 512, kv);
        let idx = Tensor::randint(512, [3, 16], (Kind::Int64, Device::Cpu));
        let x = m.hidden(&idx, None);
        assert_eq!(x.size(), [3, 16, 32]);
        assert_eq!(m.logits(&x).size(), [3, 16, 512]);
        let z = m.logits(&x);
        assert!(f64::try_from(z.abs().max()).unwrap() <= SOFTCAP, "soft-capped");
        assert_eq!(m.loss(&idx, &idx, Reduction::Mean).size(), Vec::<i64>::new());
    }
}

#[test]
fn every_file_build_rs_reads_is_embedded_in_the_log() {
    // build.rs names the kernel sources it compiles or includes as "kernels/..." literals; a log that lacked one could
    // not rebuild its run (`train_gpt source`)
    let build = EMBEDDED_FILES.iter().find(|(n, _)| *n == "build.rs").unwrap().1;
    let named: Vec<&str> = build.split('"').filter(|w| w.starts_with("kernels/") && !w.contains(['{', ' '])).collect();
    assert!(named.contains(&"kernels/ext.cpp") && named.len() >= 5, "{named:?}");
    for f in named {
        assert!(EMBEDDED_FILES.iter().any(|(n, _)| *n == f), "{f}: build.rs reads it, EMBEDDED_FILES lacks it");
    }
}

#[test]
fn the_embedded_source_has_no_log_separator_lines() {
    // a log splits at its first 100-'=' line and at 40-'-' lines: the harness's own source and the files embedded
    // after it must hold neither
    let lines = SOURCE.lines().chain(EMBEDDED_FILES.iter().flat_map(|(_, text)| text.lines()));
    assert!(!lines.map(str::trim_end).any(|l| l == "=".repeat(100) || l == "-".repeat(40)));
}

#[test]
fn parameter_count_of_the_speedrun_model() {
    let cfg = shape("causal", [6, 6, 0, 384, 1024, 50304]);
    assert_eq!(Model::new(cfg, Device::Cpu, Kind::Float, None).n_params(), 29_933_568);
}

#[test]
fn causality() {
    for (attn, kv) in VARIANTS {
        let m = small_kv(attn, 512, kv);
        let idx = Tensor::randint(512, [2, 16], (Kind::Int64, Device::Cpu));
        let j = 9;
        let changed = idx.copy();
        let _ = changed.narrow(1, j, 1).copy_(&(idx.narrow(1, j, 1) + 1).remainder(512));
        let (a, b) = tch::no_grad(|| (m.logits(&m.hidden(&idx, None)), m.logits(&m.hidden(&changed, None))));
        let past = (a.narrow(1, 0, j) - b.narrow(1, 0, j)).abs().max().double_value(&[]);
        let now = (a.narrow(1, j, 16 - j) - b.narrow(1, j, 16 - j)).abs().max().double_value(&[]);
        assert!(past < 1e-5, "{attn}: a later token changed an earlier logit by {past}");
        assert!(now > 1e-4, "{attn}: the changed token must matter from its position on");
    }
}

#[test]
fn loss_at_init_is_ln_vocab() {
    let m = small("causal", 50304);
    let idx = Tensor::randint(50304, [4, 16], (Kind::Int64, Device::Cpu));
    let l = tch::no_grad(|| m.loss(&idx, &idx.roll([1], [1]), Reduction::Mean)).double_value(&[]);
    assert!((l - (50304f64).ln()).abs() < 0.05, "init loss {l} vs ln V {}", (50304f64).ln());
}

#[test]
fn a_few_steps_on_one_batch_lower_its_loss() {
    for (attn, kv) in [("causal", 0), ("tau-lt", 0), ("tau-lt", 1)] {
        let mut m = small_kv(attn, 512, kv);
        let a = args(&["--warmup-steps", "1"]);
        let mut opt = Optim::new(&m);
        let (x, y) = (
            Tensor::randint(512, [4, 16], (Kind::Int64, Device::Cpu)),
            Tensor::randint(512, [4, 16], (Kind::Int64, Device::Cpu)),
        );
        let first = m.loss(&x, &y, Reduction::Mean).double_value(&[]);
        for _ in 0..15 {
            let _ = train_step(&mut m, &mut opt, &x, &y, &a, 1.0, None).unwrap();
        }
        let last = m.loss(&x, &y, Reduction::Mean).double_value(&[]);
        assert!(last < first - 1.0, "{attn}: loss {first} -> {last}");
    }
}

#[test]
fn muon_shards_over_ranks_add_up_to_the_whole_update() {
    let m = small("causal", 512);
    let (x, y) = (
        Tensor::randint(512, [2, 16], (Kind::Int64, Device::Cpu)),
        Tensor::randint(512, [2, 16], (Kind::Int64, Device::Cpu)),
    );
    m.loss(&x, &y, Reduction::Mean).backward();
    let a = args(&[]);
    let whole = Optim::new(&m).muon_updates(&a, 1.0, Kind::Float, 0, 1);
    // 2 layers: two matrices of each of the 4 shapes. 2 ranks get one of each; a third rank gets none.
    for (world, idle) in [(2, 0), (3, 1)] {
        let shards: Vec<Tensor> =
            (0..world).map(|r| Optim::new(&m).muon_updates(&a, 1.0, Kind::Float, r, world)).collect();
        // every element is owned by exactly one rank; the sum is the single-rank update
        let owners = shards
            .iter()
            .map(|s| s.ne(0.0).to_kind(Kind::Int64))
            .fold(Tensor::zeros_like(&whole).to_kind(Kind::Int64), |acc, o| acc + o);
        assert_eq!(owners.max().int64_value(&[]), 1);
        assert_eq!(
            shards.iter().filter(|s| Tensor::ne(s, 0.0).any().int64_value(&[]) == 0).count(),
            idle,
            "world {world}"
        );
        let sum = shards.iter().fold(Tensor::zeros_like(&whole), |acc, s| acc + s);
        assert!((sum - &whole).abs().max().double_value(&[]) < 1e-6, "world {world}");
    }
}

#[test]
fn chunked_head_matches_autograd() {
    for attn in ["causal", "tau-lt"] {
        let mut m = small(attn, 512);
        // large logits, so that the soft cap's slope (1 − t²) is far from 1 and must be right
        tch::no_grad(|| {
            let w = &mut m.params[0].1;
            let big = &*w * 50.0;
            w.copy_(&big)
        });
        let (x, y) = (
            Tensor::randint(512, [3, 16], (Kind::Int64, Device::Cpu)),
            Tensor::randint(512, [3, 16], (Kind::Int64, Device::Cpu)),
        );
        let (l0, g0) = m.loss_and_grads(&x, &y, 0, 0);
        for chunk in [7, 48, 1000] {
            let (l1, g1) = m.loss_and_grads(&x, &y, 0, chunk);
            assert!((l0 - l1).abs() < 1e-5, "{attn} chunk {chunk}: loss {l0} vs {l1}");
            for ((n, _), (a, b)) in m.params.iter().zip(g0.iter().zip(&g1)) {
                let err = (a - b).abs().max().double_value(&[]) / (a.abs().max().double_value(&[]) + 1e-12);
                assert!(err < 1e-4, "{attn} chunk {chunk}: {n} differs by {err} (relative)");
            }
        }
    }
}

#[test]
#[should_panic(expected = "cross-entropy (fused): z and y must be on one CUDA device")]
fn fused_cross_entropy_refuses_cpu_tensors() {
    let _ = softcap_ce_fused(
        &mut Tensor::zeros([2, 5], (Kind::Float, Device::Cpu)),
        &Tensor::zeros([2], (Kind::Int64, Device::Cpu)),
        1.0,
        true,
    );
}

#[test]
fn ranks_split_the_batch_and_the_val_set_without_gaps() {
    for (n, world) in [(64, 1), (64, 2), (64, 8), (869, 2), (869, 3)] {
        let blocks: Vec<(i64, i64)> = (0..world).map(|r| rank_rows(n, r, world)).collect();
        assert_eq!(blocks[0].0, 0);
        for w in blocks.windows(2) {
            assert_eq!(w[0].0 + w[0].1, w[1].0, "contiguous");
        }
        assert_eq!(blocks.last().map(|b| b.0 + b.1), Some(n), "everything covered");
    }
    // two ranks read the same tokens as one, half each
    let toks = device_tokens(&(0..5000u16).collect::<Vec<_>>(), Device::Cpu);
    let (whole, next) = train_batch(&toks, 3, 8, 16, 0, 1);
    // step 3 of 8×16 starts at token 3·128 = 384; the targets are the inputs one token on
    assert_eq!(
        (whole.kind(), whole.size(), whole.int64_value(&[0, 0]), whole.int64_value(&[7, 15])),
        (Kind::Int64, vec![8, 16], 384, 511)
    );
    assert!(next.equal(&(&whole + 1)));
    let halves: Vec<Tensor> = (0..2).map(|r| train_batch(&toks, 3, 8, 16, r, 2).0).collect();
    assert!(Tensor::cat(&halves, 0).equal(&whole));
}

#[test]
fn torchrun_variables() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    };
    assert_eq!(dist_env(env(&[])).unwrap(), None);
    assert_eq!(dist_env(env(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(), None);
    let e = dist_env(env(&[("WORLD_SIZE", "4"), ("RANK", "2"), ("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "1234")]))
        .unwrap()
        .unwrap();
    assert_eq!(e, DistEnv { rank: 2, world: 4, local_rank: 2, addr: "10.0.0.1".into(), port: 1234 });
    assert!(dist_env(env(&[("WORLD_SIZE", "2")])).unwrap_err().contains("RANK is unset"));
    assert!(dist_env(env(&[("WORLD_SIZE", "2"), ("RANK", "2")])).unwrap_err().contains("0 ≤ RANK < WORLD_SIZE"));
    assert!(dist_env(env(&[("WORLD_SIZE", "two"), ("RANK", "0")])).unwrap_err().contains("not a number"));
}

#[test]
fn micro_batches_accumulate_the_same_gradient() {
    let mut m = small("tau-lt", 512);
    let (x, y) = (
        Tensor::randint(512, [8, 16], (Kind::Int64, Device::Cpu)),
        Tensor::randint(512, [8, 16], (Kind::Int64, Device::Cpu)),
    );
    let (l0, g0) = m.loss_and_grads(&x, &y, 0, 0);
    for (micro, chunk) in [(2, 0), (4, 0), (1, 5)] {
        let (l1, g1) = m.loss_and_grads(&x, &y, micro, chunk);
        assert!((l0 - l1).abs() < 1e-5, "micro {micro}: loss {l0} vs {l1}");
        for (a, b) in g0.iter().zip(&g1) {
            assert!(
                (a - b).abs().max().double_value(&[]) <= 1e-5 * (1.0 + a.abs().max().double_value(&[])),
                "micro {micro} chunk {chunk}"
            );
        }
    }
}

#[test]
fn newton_schulz_singular_values_near_one() {
    tch::manual_seed(1);
    for (r, c) in [(64, 32), (32, 96), (48, 48)] {
        // an ill-conditioned input: singular values spread over two decades (5 steps lift σ ≥ ~1e-3·‖G‖)
        let (u, _, v) = Tensor::randn([r, c], (Kind::Double, Device::Cpu)).svd(true, true);
        let s = Tensor::logspace(0.0, -2.0, r.min(c), 10.0, (Kind::Double, Device::Cpu));
        let g = (u * s.unsqueeze(0)).matmul(&v.tr()).to_kind(Kind::Float);
        let sv =
            Vec::<f64>::try_from(newton_schulz(&g, 5, Kind::Float).to_kind(Kind::Double).svd(true, false).1).unwrap();
        assert_eq!(newton_schulz(&g, 5, Kind::Float).size(), [r, c]);
        assert!(sv.iter().all(|&x| (0.6..1.25).contains(&x)), "{r}x{c}: {sv:?}");
        // a stack goes through as its matrices one by one (each with its own norm: the second is 10× the first)
        let stack = newton_schulz(&Tensor::stack(&[&g, &(&g.flip([0]) * 10.0)], 0), 5, Kind::Float);
        for (k, m) in [g.shallow_clone(), &g.flip([0]) * 10.0].iter().enumerate() {
            let err = (stack.get(k as i64) - newton_schulz(m, 5, Kind::Float)).abs().max().double_value(&[]);
            assert!(err < 1e-5, "{r}x{c} stack {k}: {err}");
        }
    }
}

#[test]
fn lr_schedule_warms_up_holds_and_cools_to_zero() {
    let a = args(&["--steps", "100", "--warmup-steps", "10", "--cooldown-frac", "0.4"]);
    assert!((lr_mult(&a, 0) - 0.1).abs() < 1e-12 && lr_mult(&a, 9) == 1.0 && lr_mult(&a, 59) == 1.0);
    assert!(
        (lr_mult(&a, 60) - 1.0).abs() < 1e-12
            && (lr_mult(&a, 80) - 0.5).abs() < 1e-12
            && lr_mult(&a, 99) > 0.0
            && lr_mult(&a, 100) == 0.0
    );
}

#[test]
fn lambda_in_unit_interval_and_scale_invariant() {
    let lap = chain_laplacian(16);
    let x = Tensor::randn([2, 3, 10, 16], (Kind::Float, Device::Cpu));
    let (e, lam) = taumode(&x, &lap, 0.7);
    assert_eq!(lam.size(), [2, 3, 10]);
    assert!(e.min().double_value(&[]) >= 0.0, "L is PSD, so E ≥ 0");
    assert!(lam.min().double_value(&[]) >= 0.0 && lam.max().double_value(&[]) < 1.0);
    let (_, scaled) = taumode(&(&x * 37.5), &lap, 0.7);
    assert!((scaled - &lam).abs().max().double_value(&[]) < 1e-5, "λ(cx) = λ(x)");
}

// The direct O(T²) formula, one pair at a time.
fn tau_attention_direct(lq: &[f64], lk: &[f64], v: &[Vec<f64>], inv_temp: f64) -> Vec<Vec<f64>> {
    let (tq, tk) = (lq.len(), lk.len());
    (0..tq)
        .map(|i| {
            let last = i + tk - tq; // the query at row i sits at key position i + (tk − tq)
            let w: Vec<f64> = (0..=last).map(|j| (-(lq[i] - lk[j]).abs() * inv_temp).exp()).collect();
            let z: f64 = w.iter().sum();
            (0..v[0].len()).map(|d| (0..=last).map(|j| w[j] / z * v[j][d]).sum()).collect()
        })
        .collect()
}

#[test]
fn tau_attention_equals_direct_formula() {
    let (h, tk, d) = (3i64, 11i64, 5i64);
    for tq in [tk, 1, 4] {
        let lq = Tensor::rand([1, h, tq], (Kind::Double, Device::Cpu));
        let lk = Tensor::rand([1, h, tk], (Kind::Double, Device::Cpu));
        let v = Tensor::randn([1, h, tk, d], (Kind::Double, Device::Cpu));
        let it = Tensor::from_slice(&[1.0f64, 4.0, 20.0]);
        let y = tau_attention(&lq, &lk, &v, &it);
        for hh in 0..h {
            let row = |t: &Tensor| Vec::<f64>::try_from(t.get(0).get(hh)).unwrap();
            let vv: Vec<Vec<f64>> = (0..tk).map(|j| Vec::<f64>::try_from(v.get(0).get(hh).get(j)).unwrap()).collect();
            let want = tau_attention_direct(&row(&lq), &row(&lk), &vv, it.double_value(&[hh]));
            for (i, wi) in want.iter().enumerate() {
                let got = Vec::<f64>::try_from(y.get(0).get(hh).get(i as i64)).unwrap();
                assert!(got.iter().zip(wi).all(|(g, w)| (g - w).abs() < 1e-10), "tq={tq} head {hh} row {i}");
            }
        }
    }
}

#[test]
fn chunked_tau_attention_matches_the_plain_path() {
    let opts = (Kind::Double, Device::Cpu);
    for (tq, tk, chunk, learn) in
        [(13, 13, 4, true), (13, 13, 13, false), (5, 13, 2, true), (1, 9, 3, true), (16, 16, 100, false)]
    {
        let lq = Tensor::rand([2, 3, tq], opts).set_requires_grad(true);
        let lk = Tensor::rand([2, 3, tk], opts).set_requires_grad(true);
        let v = Tensor::randn([2, 3, tk, 5], opts).set_requires_grad(true);
        let it = Tensor::from_slice(&[1.0f64, 6.0, 20.0]).set_requires_grad(learn);
        let probe = Tensor::randn([2, 3, tq, 5], opts);
        let grads = |y: Tensor| {
            (y.shallow_clone() * &probe).sum(Kind::Double).backward();
            let g: Vec<Tensor> = [&lq, &lk, &v, &it]
                .iter()
                .map(|t| {
                    let g = t.grad();
                    if g.defined() {
                        g.copy()
                    } else {
                        Tensor::zeros([1], opts)
                    }
                })
                .collect();
            for t in [&lq, &lk, &v, &it] {
                t.shallow_clone().zero_grad();
            }
            (y.detach(), g)
        };
        let (y0, g0) = grads(tau_attention(&lq, &lk, &v, &it));
        let (y1, g1) = grads(tau_attention_chunked(&lq, &lk, &v, &it, chunk));
        assert!((&y0 - &y1).abs().max().double_value(&[]) < 1e-12, "tq {tq} tk {tk} chunk {chunk}: forward");
        for (i, (a, b)) in g0.iter().zip(&g1).enumerate() {
            assert!(
                (a - b).abs().max().double_value(&[]) < 1e-10,
                "tq {tq} tk {tk} chunk {chunk}: gradient of input {i}"
            );
        }
    }
}

#[test]
fn tau_gradients_match_finite_differences() {
    let lap = chain_laplacian(4).to_kind(Kind::Double);
    let opts = (Kind::Double, Device::Cpu);
    let (q, k, v) =
        (Tensor::randn([1, 2, 5, 4], opts), Tensor::randn([1, 2, 5, 4], opts), Tensor::randn([1, 2, 5, 4], opts));
    let it = Tensor::from_slice(&[3.0f64, 7.0]);
    let probe = Tensor::randn([1, 2, 5, 4], opts);
    let f = |x: &[Tensor]| {
        (tau_attention(&taumode(&x[0], &lap, 0.8).1, &taumode(&x[1], &lap, 0.8).1, &x[2], &x[3]) * &probe)
            .sum(Kind::Double)
    };
    let inputs =
        [q.set_requires_grad(true), k.set_requires_grad(true), v.set_requires_grad(true), it.set_requires_grad(true)];
    assert_gradients_match_finite_differences("tau", &inputs, f, 1, 1e-6);
}

#[test]
fn cached_and_uncached_greedy_decoding_agree() {
    for (attn, kv) in VARIANTS {
        let m = small_kv(attn, 512, kv);
        let prompt = [5i64, 17, 300, 2, 99];
        let cached = generate(&m, &prompt, 11, 0.0, 1, 0, true).unwrap();
        assert_eq!(cached, generate(&m, &prompt, 11, 0.0, 1, 0, false).unwrap(), "{attn}");
        assert_eq!(cached.len(), 11);
        // stronger than tokens: the hidden states of a prefill + one-token steps equal one full forward
        let idx = Tensor::randint(512, [2, 12], (Kind::Int64, Device::Cpu));
        let full = tch::no_grad(|| m.hidden(&idx, None));
        let mut cache = Cache::new(m.cfg.n_layer, 12);
        let mut parts = vec![tch::no_grad(|| m.forward(&idx.narrow(1, 0, 5), Some(&mut cache), None))];
        for i in 5..12 {
            parts.push(tch::no_grad(|| m.forward(&idx.narrow(1, i, 1), Some(&mut cache), None)));
        }
        let diff = (Tensor::cat(&parts, 1) - full).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "{attn}: cached forward differs by {diff}");
    }
}

#[test]
fn cache_holds_what_each_variant_keeps() {
    let (b, t) = (3i64, 7i64);
    for (attn, kv) in VARIANTS {
        let m = small_kv(attn, 512, kv);
        let mut cache = Cache::new(m.cfg.n_layer, t);
        let _ = tch::no_grad(|| {
            m.forward(&Tensor::randint(512, [b, t], (Kind::Int64, Device::Cpu)), Some(&mut cache), None)
        });
        let (l, h, d, r) = (m.cfg.n_layer, m.cfg.kv_heads(), m.cfg.head_dim(), m.cfg.bands);
        assert_eq!(h, if kv == 1 { 1 } else { 2 });
        // bytes a token a layer at `s` bytes a compute-dtype element (λ's are fp32)
        let per = |s: i64| match attn {
            "causal" | "sliding" => 2 * h * d * s,
            "tau" | "tau-lt" => h * (d * s + 4),
            "tau-full" => h * d * s + 4,
            "tau-multi" => h * (d * s + 4 * r),
            "tau-bias" => h * (2 * d * s + 4),
            _ => panic!("{attn}: say what its cache holds"),
        };
        assert_eq!((cache.len(), cache.bytes()), (t, l * b * t * per(4)), "{attn}/{kv}");
        assert_eq!(cache_bytes_formula(&m.cfg, Kind::Float, b, t), l * b * t * per(4), "{attn}/{kv}");
        assert_eq!(cache_bytes_formula(&m.cfg, Kind::BFloat16, b, t), l * b * t * per(2), "{attn}/{kv}");
    }
}

#[test]
fn a_sample_cut_inside_a_character_still_decodes() {
    let text = "naïve ✓ 中文";
    let ids: Vec<i64> = tokenizer().encode_ordinary(text).into_iter().map(|x| x as i64).collect();
    let prefixes: Vec<String> = (1..=ids.len()).map(|n| decode_ids(&ids[..n]).unwrap()).collect();
    assert_eq!(prefixes.last().unwrap(), text);
    assert!(prefixes.iter().any(|p| p.contains('\u{FFFD}')), "some prefix ends inside a character: {prefixes:?}");
}

#[test]
fn samples_are_reproducible_from_a_seed() {
    let m = small("tau-lt", 512);
    let draw = |seed| generate(&m, &[1, 2, 3], 12, 1.0, 50, seed, true).unwrap();
    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7), draw(8), "another seed, another sample (12 tokens from 50 candidates)");
}

#[test]
fn checkpoint_round_trip() {
    for (attn, kv) in VARIANTS {
        let m = small_kv(attn, 512, kv);
        let p = tmp(&format!("{attn}-{kv}.safetensors"));
        save_checkpoint(&m, &p, Existing::Replace).unwrap();
        let back = load_checkpoint(&p, Device::Cpu).unwrap();
        assert_eq!(back.cfg, m.cfg);
        let idx = Tensor::randint(512, [1, 16], (Kind::Int64, Device::Cpu));
        let (a, b) = tch::no_grad(|| (m.logits(&m.hidden(&idx, None)), back.logits(&back.hidden(&idx, None))));
        assert!((a - b).abs().max().double_value(&[]) == 0.0, "{attn}: reloaded weights give the same logits");
    }
    // what load_checkpoint checks a file against is what Model::new builds
    for (attn, kv) in VARIANTS {
        let m = small_kv(attn, 512, kv);
        let built: Vec<(String, Vec<i64>)> = m.params.iter().map(|(n, p)| (n.clone(), p.size())).collect();
        assert_eq!(built, m.cfg.param_shapes(), "{attn}");
        let kept: Vec<(String, Vec<i64>)> = m.checkpoint_buffers().iter().map(|(n, p)| (n.clone(), p.size())).collect();
        assert_eq!(kept, m.cfg.buffer_shapes(), "{attn}");
    }
    let e = load_checkpoint(&tmp("nothing.safetensors"), Device::Cpu).err().unwrap();
    assert!(e.contains("--save-checkpoint"), "{e}");
}

// Issue 19: a resumed run's optimizer is the interrupted one's, bit for bit: every Muon and Adam buffer through
// safetensors_bytes and load_optimizer, in its own dtype (bf16 too), and a buffer of another shape is refused.
#[test]
fn optimizer_state_round_trips_bit_for_bit() {
    let m = small("tau-lt", 512);
    let opt = Optim::new(&m);
    let names: Vec<String> = opt.state().iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names.len(), opt.muon.len() + 2 * opt.adam.len());
    tch::no_grad(|| opt.state().iter().for_each(|(_, t)| drop(t.shallow_clone().normal_(0.0, 1.0))));
    let p = tmp("optimizer.safetensors");
    std::fs::write(&p, safetensors_bytes(&opt.state(), None).unwrap()).unwrap();
    let mut back = Optim::new(&m);
    load_optimizer(&mut back, &p, Device::Cpu).unwrap();
    for ((n, a), (_, b)) in opt.state().iter().zip(back.state()) {
        assert!(a.equal(&b) && b.abs().sum(Kind::Double).double_value(&[]) > 0.0, "{n} restored exactly");
    }
    let bf = Tensor::randn([3, 5], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let bytes = safetensors_bytes(&[("x".into(), bf.shallow_clone())], None).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st_tensor(&st, "x", Kind::BFloat16, &[3, 5], Device::Cpu).unwrap().equal(&bf));
    let e = st_tensor(&st, "x", Kind::Float, &[3, 5], Device::Cpu).err().unwrap();
    assert_eq!(e, "tensor x is BF16 [3, 5], expected F32 [3, 5]");
    let other = small("tau-lt", 256); // another vocabulary
    let e = load_optimizer(&mut Optim::new(&other), &p, Device::Cpu).err();
    assert!(e.is_some_and(|e| e.contains("missing") || e.contains("expected")), "another model's buffers refused");
}

fn max_abs(t: &Tensor) -> f64 {
    f64::try_from(t.abs().max()).unwrap()
}

/// Laplacian invariants: symmetric, zero row sums, PSD, off-diagonals are edge weights in [w(eps), 1].
fn assert_graph_laplacian(l: &Tensor, f: i64) {
    assert_eq!(l.size(), [f, f]);
    assert_eq!(l.kind(), Kind::Float);
    let scale = max_abs(l);
    assert!(max_abs(&(l - l.transpose(0, 1))) == 0.0, "L must be exactly symmetric");
    assert!(max_abs(&l.sum_dim_intlist(1, false, Kind::Double)) < 1e-4 * scale, "rows must sum to 0");
    let e = eig(l);
    assert!(e[0] >= -1e-4 * e[f as usize - 1], "L must be PSD, min eig {}", e[0]);
}

// Zipf-like Markov source: mostly a short hop from the previous token (local structure the graph can see), else a fresh
// Zipf draw.
fn zipf_markov(n: usize, vocab: usize, seed: u64) -> Vec<u16> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cdf: Vec<f64> = (1..=vocab)
        .map(|r| (r as f64).powf(-1.1))
        .scan(0.0, |a, x| {
            *a += x;
            Some(*a)
        })
        .collect();
    let z = *cdf.last().unwrap();
    cdf.iter_mut().for_each(|c| *c /= z);
    let draw = |rng: &mut StdRng| {
        let u = rng.gen::<f64>();
        cdf.partition_point(|&c| c < u).min(vocab - 1)
    };
    let mut prev = draw(&mut rng);
    (0..n)
        .map(|_| {
            prev = if rng.gen_bool(0.6) { (prev + 1 + draw(&mut rng) % 8) % vocab } else { draw(&mut rng) };
            ((prev * 31 + 5) % 65536) as u16 // 31 is odd, so this scatters ids bijectively over u16
        })
        .collect()
}

fn small_cfg() -> LapConfig {
    LapConfig { n_tokens: 300_000, k_items: 1024, ..LapConfig::default() }
}

#[test]
fn chain() {
    for f in [2i64, 8, 64] {
        let l = chain_laplacian(f);
        assert_graph_laplacian(&l, f);
        let want = 2.0 - 2.0 * (std::f64::consts::PI / f as f64).cos();
        assert!((eig(&l)[1] - want).abs() < 1e-4, "F={f}: λ2 {} vs {want}", eig(&l)[1]);
        let s = laplacian_stats(&l, 0.0);
        assert_eq!(
            (s.nnz, s.deg_min, s.deg_max, s.connected, s.n_components),
            (3 * f - 2, 1, if f > 2 { 2 } else { 1 }, true, 1)
        );
    }
}

#[test]
fn cooc_and_ppmi_by_hand() {
    // ids 1 (×3) and 2 (×2) are the top K=2 items 0 and 1; id 3 is ignored.
    let toks = Tensor::from_slice(&[1i64, 2, 1, 3, 1, 2]);
    let c = lap_cooc(&toks, 2, 1).unwrap();
    assert!(c.equal(&Tensor::from_slice(&[0i64, 3, 3, 0]).view([2, 2])), "{c}"); // 1-2 adjacent: (0,1),(1,0),(0,1)
    let c = lap_cooc(&toks, 2, 2).unwrap();
    assert!(c.equal(&Tensor::from_slice(&[4i64, 3, 3, 0]).view([2, 2])), "{c}"); // offset 2 adds 1…1 twice
    assert!(lap_cooc(&toks, 4, 1).unwrap_err().contains("only 3 distinct tokens"));
    // c=[[0,2],[2,4]]: total 8, rows 2 and 6: pmi01 = ln(2·8/12) > 0, pmi11 = ln(4·8/36) < 0 → 0, c00 = 0 → 0.
    let p = lap_ppmi(&Tensor::from_slice(&[0.0f32, 2.0, 2.0, 4.0]).view([2, 2]));
    let x = (4.0f32 / 3.0).ln();
    assert!(max_abs(&(p - Tensor::from_slice(&[0.0f32, x, x, 0.0]).view([2, 2]))) < 1e-6);
}

#[test]
fn rsvd_matches_exact_svd_on_low_rank() {
    let mut rng = StdRng::seed_from_u64(1);
    let (a, b) = (lap_gaussian(300, 8, &mut rng), lap_gaussian(8, 200, &mut rng));
    let m = a.matmul(&b);
    let us = lap_rsvd(&m, 8, &mut rng);
    let got = us.to_device(Device::Cpu).norm_scalaropt_dim(2.0, [0i64], false); // column norms of U·S are S
    let want = m.to_kind(Kind::Double).svd(true, false).1.narrow(0, 0, 8);
    assert!(max_abs(&((got - &want) / &want)) < 1e-3);
}

#[test]
fn kmeans_separates_blobs() {
    let mut rng = StdRng::seed_from_u64(2);
    let centres = Tensor::from_slice(&[0.0, 0.0, 10.0, 0.0, 0.0, 10.0]).view([3, 2]);
    let x = centres.repeat_interleave_self_int(50, 0, None::<i64>)
        + lap_gaussian(150, 2, &mut rng).to_kind(Kind::Double) * 0.1;
    let c = lap_kmeans(&x, 3, &mut rng);
    let nearest = lap_sqdist(&c, &centres).min_dim(1, false).0; // every true centre found to within the noise
    assert!(max_abs(&nearest) < 0.1, "{nearest}");
}

#[test]
fn corpus_build_synthetic() {
    let toks = zipf_markov(300_000, 4000, 7);
    let cfg = small_cfg();
    let t0 = std::time::Instant::now();
    let l = corpus_laplacian(&toks, &cfg, Device::Cpu).unwrap();
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    assert_graph_laplacian(&l, 64);
    let off = &l - l.diagonal(0, 0, 1).diag_embed(0, 0, 1);
    let w_min = 1.0 / (1.0 + (cfg.eps / cfg.sigma).powf(cfg.p));
    let w = off.neg().masked_select(&off.ne(0.0));
    assert!(
        f64::try_from(w.min()).unwrap() >= w_min - 1e-6 && f64::try_from(w.max()).unwrap() <= 1.0,
        "edge weights outside [w(eps), 1]"
    );
    let s = laplacian_stats(&l, ms);
    assert!(s.deg_min >= 1 && s.deg_max <= 63 && s.nnz > 64);
    assert_eq!(s.connected, s.lambda2 > LAP_CONNECTED_TOL);
    println!("synthetic: {}", s.to_json());
    let again = corpus_laplacian(&toks, &cfg, Device::Cpu).unwrap();
    assert!(l.equal(&again), "same seed must give the identical L");
    let other = corpus_laplacian(&toks, &LapConfig { seed: 1, ..small_cfg() }, Device::Cpu).unwrap();
    assert_graph_laplacian(&other, 64); // a different seed is a different (valid) k-means draw
}

#[test]
fn corpus_build_errors() {
    let few = zipf_markov(10_000, 100, 3);
    let e = corpus_laplacian(&few, &small_cfg(), Device::Cpu).unwrap_err();
    assert!(e.contains("distinct tokens") && e.contains("lower --lap-k") && !e.contains('\n'), "{e}");
    let e = corpus_laplacian(&few[..3], &small_cfg(), Device::Cpu).unwrap_err();
    assert!(e.contains("window"), "{e}");
    let e = corpus_laplacian(&few, &LapConfig { k_items: 32, ..small_cfg() }, Device::Cpu).unwrap_err();
    assert!(e.contains("K=32 out of range"), "{e}");
    let e = corpus_laplacian(&few, &LapConfig { sigma: 0.0, k_items: 64, ..small_cfg() }, Device::Cpu).unwrap_err();
    assert!(e.contains("positive"), "{e}");
}

#[test]
fn tiny_corpus_is_connected() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tiny");
    let dir = dir.as_path();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "txt")).collect()
        })
        .unwrap_or_default();
    assert!(!files.is_empty(), "the tiny corpus ships in data/tiny");
    files.sort();
    let bpe = tokenizer();
    let toks: Vec<u16> = files
        .iter()
        .flat_map(|p| bpe.encode_ordinary(&std::fs::read_to_string(p).unwrap()))
        .map(|t| u16::try_from(t).unwrap())
        .collect();
    let cfg = LapConfig { k_items: 2048, ..LapConfig::default() };
    let t0 = std::time::Instant::now();
    let l = corpus_laplacian(&toks, &cfg, Device::Cpu).unwrap();
    let s = laplacian_stats(&l, t0.elapsed().as_secs_f64() * 1e3);
    println!("tiny corpus: {} files, {} tokens, K={}: {}", files.len(), toks.len(), cfg.k_items, s.to_json());
    assert_graph_laplacian(&l, 64);
    assert!(s.connected && s.n_components == 1 && s.lambda2 > LAP_CONNECTED_TOL, "{}", s.to_json());
}

// Defaults at full size (10M tokens, K=4096) on CPU: `cargo test --release -- --ignored --nocapture`.
#[test]
#[ignore]
fn default_size_cpu_timing() {
    let toks = zipf_markov(10_000_000, 20_000, 11);
    let t0 = std::time::Instant::now();
    let l = corpus_laplacian(&toks, &LapConfig::default(), Device::Cpu).unwrap();
    let s = laplacian_stats(&l, t0.elapsed().as_secs_f64() * 1e3);
    println!("default size (synthetic 10M tokens, K=4096): {}", s.to_json());
    assert_graph_laplacian(&l, 64);
}

#[test]
fn npy_round_trip_and_load_errors() {
    let l = chain_laplacian(64) * 0.37;
    let p = tmp("l.npy");
    save_laplacian(&p, &l).unwrap();
    assert!(load_laplacian_file(&p, 64).unwrap().equal(&l));
    // f64 .npy and .safetensors load too (converted to f32)
    let p64 = tmp("l64.npy");
    l.to_kind(Kind::Double).write_npy(&p64).unwrap();
    assert!(load_laplacian_file(&p64, 64).unwrap().equal(&l));
    let ps = tmp("l.safetensors");
    Tensor::write_safetensors(&[("anything", &l)], &ps).unwrap();
    assert!(load_laplacian_file(&ps, 64).unwrap().equal(&l));

    let err = |p: &Path, dim: i64, want: &str| {
        let e = load_laplacian_file(p, dim).unwrap_err();
        assert!(e.contains(want) && !e.contains('\n'), "expected '{want}' in: {e}");
    };
    err(&p, 32, "shape [64, 64], need [32, 32]");
    let asym = l.copy();
    let _ = asym.get(0).get(5).fill_(1.0);
    let pa = tmp("asym.npy");
    save_laplacian(&pa, &asym).unwrap();
    err(&pa, 64, "not symmetric");
    let pn = tmp("nan.npy");
    save_laplacian(&pn, &(&l * f64::NAN)).unwrap();
    err(&pn, 64, "NaN");
    err(&tmp("missing.npy"), 64, "not found");
    let pg = tmp("garbage.npy");
    std::fs::write(&pg, b"this is not a numpy file at all").unwrap();
    err(&pg, 64, "bad magic");
    let pt = tmp("trunc.npy");
    std::fs::write(&pt, &std::fs::read(&p).unwrap()[..1000]).unwrap();
    err(&pt, 64, "truncated or corrupt");
    let pgs = tmp("garbage.safetensors");
    std::fs::write(&pgs, b"\x10\x00\x00\x00\x00\x00\x00\x00{nonsense}").unwrap();
    err(&pgs, 64, "not a valid safetensors");
    let px = tmp("l.txt");
    std::fs::write(&px, b"x").unwrap();
    err(&px, 64, "unknown extension");
    assert!(save_laplacian(&tmp("x.npy"), &Tensor::zeros([3, 4], (Kind::Float, Device::Cpu)))
        .unwrap_err()
        .contains("not square"));
}

#[test]
fn kernels_auto_takes_the_fused_path_wherever_it_can() {
    let cuda = Device::Cuda(0); // a value only: resolve_kernels does not touch the device
    assert_eq!(resolve_kernels(Kernels::Auto, 0, cuda, 64).unwrap(), Kernels::Fused);
    assert_eq!(resolve_kernels(Kernels::Auto, 256, cuda, 64).unwrap(), Kernels::Plain); // --tau-chunk is plain's
    assert_eq!(resolve_kernels(Kernels::Auto, 0, cuda, 48).unwrap(), Kernels::Plain); // no kernel for D 48
    assert_eq!(resolve_kernels(Kernels::Auto, 0, Device::Cpu, 64).unwrap(), Kernels::Plain);
    assert_eq!(resolve_kernels(Kernels::Plain, 0, cuda, 64).unwrap(), Kernels::Plain);
    assert!(resolve_kernels(Kernels::Fused, 0, Device::Cpu, 64).unwrap_err().contains("needs CUDA"));
    assert!(resolve_kernels(Kernels::Fused, 256, cuda, 64).unwrap_err().contains("--tau-chunk"));
    assert!(resolve_kernels(Kernels::Fused, 0, cuda, 48).unwrap_err().contains("head dim 48"));
}

// ----------------------------------------------------------------------------------------------------------------
// GPU tests: ignored by default. On a CUDA box (no cargo there): build them here with
// `cargo test --release --no-run`, carry target/release/deps/train_gpt-<hash>, and run it with
// `LD_LIBRARY_PATH=<torch>/lib train_gpt-<hash> --ignored --test-threads 1`.

mod gpu {
    use super::*;

    fn cuda() -> Device {
        load_cuda_runtime();
        assert!(tch::Cuda::is_available(), "these tests need a CUDA GPU");
        Device::Cuda(0)
    }

    // The same small model (same weights) on the CPU in f32 and on the GPU in bf16.
    fn twins(attn: &str, kv: i64) -> (Model, Model) {
        let dev = cuda();
        tch::manual_seed(0);
        let cfg = shape(attn, [2, 4, kv, 128, 64, 1024]);
        let lap = chain_for(&cfg);
        let mut cpu = Model::new(cfg, Device::Cpu, Kind::Float, lap);
        cpu.tau = vec![0.8; cpu.tau.len()];
        tch::no_grad(|| {
            for (_, c) in &cpu.params {
                let w = c + c.randn_like() * 0.02; // zero-initialised projections would hide the attention
                c.shallow_clone().copy_(&w);
            }
        });
        let gpu = like(&cpu, dev, Kind::BFloat16);
        (cpu, gpu)
    }

    // A model with m's config, weights, τ and temperatures, on another device or in another compute dtype.
    fn like(m: &Model, dev: Device, cdt: Kind) -> Model {
        let mut o = Model::new(m.cfg.clone(), dev, cdt, m.cfg.is_tau().then(|| m.lap.copy()));
        o.tau = m.tau.clone();
        tch::no_grad(|| {
            o.params.iter_mut().chain(o.buffers.iter_mut()).zip(m.params.iter().chain(&m.buffers)).for_each(
                |((_, a), (_, b))| {
                    a.copy_(b);
                },
            );
        });
        o
    }

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (a.to(Device::Cpu).to_kind(Kind::Double), b.to(Device::Cpu).to_kind(Kind::Double));
        (&a - &b).abs().max().double_value(&[]) / (a.abs().max().double_value(&[]) + 1e-12)
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn bf16_gpu_loss_and_gradients_match_f32_cpu() {
        for (attn, kv) in [
            ("causal", 0),
            ("tau", 0),
            ("tau-lt", 0),
            ("causal", 2),
            ("tau", 2),
            ("sliding", 0),
            ("tau-full", 0),
            ("tau-multi", 0),
            ("tau-bias", 0),
            ("tau-bias", 2),
        ] {
            let (c, g) = twins(attn, kv);
            // the same model in bf16 on the CPU: how far bf16 itself takes each gradient from fp32
            let c16 = like(&c, Device::Cpu, Kind::BFloat16);
            let (x, y) = (
                Tensor::randint(1024, [4, 64], (Kind::Int64, Device::Cpu)),
                Tensor::randint(1024, [4, 64], (Kind::Int64, Device::Cpu)),
            );
            let lc = c.loss_backward(&x, &y, 0, 1.0).double_value(&[]);
            let _ = c16.loss_backward(&x, &y, 0, 1.0);
            let lg = g.loss_backward(&x.to(g.lap.device()), &y.to(g.lap.device()), 0, 1.0).double_value(&[]);
            assert!((lc - lg).abs() < 2e-2 * lc, "{attn}/{kv}: loss {lc} vs {lg}");
            // tau's |λq − λk| is not smooth: at inverse temperature 20 (tau-lt), bf16 rounding of q and k flips the
            // sign of near ties, so its gradients legitimately move far (0.07–0.16 for qkv, by the draw). The GPU may
            // be twice as far from fp32 as bf16 on the CPU is, and 5% in any case.
            for (((n, pc), (_, pg)), (_, ph)) in c.params.iter().zip(&g.params).zip(&c16.params) {
                let (gpu, cpu16) = (rel(&pc.grad(), &pg.grad()), rel(&pc.grad(), &ph.grad()));
                assert!(
                    gpu < (2.0 * cpu16).max(5e-2),
                    "{attn}/{kv}: {n} grad differs by {gpu} (bf16 on the CPU by {cpu16})"
                );
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn chunked_head_matches_autograd_on_gpu() {
        let (_, mut g) = twins("causal", 0);
        let dev = g.lap.device();
        let (x, y) =
            (Tensor::randint(1024, [4, 64], (Kind::Int64, dev)), Tensor::randint(1024, [4, 64], (Kind::Int64, dev)));
        let (l0, g0) = g.loss_and_grads(&x, &y, 0, 0);
        for chunk in [100, 256] {
            let (l1, g1) = g.loss_and_grads(&x, &y, 0, chunk);
            assert!((l0 - l1).abs() < 1e-3 * l0, "chunk {chunk}: {l0} vs {l1}");
            for (a, b) in g0.iter().zip(&g1) {
                assert!(rel(a, b) < 2e-2, "chunk {chunk}: {}", rel(a, b));
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn decoding_cache_matches_full_forward_on_gpu() {
        use Kernels::{Fused, Plain};
        for (attn, kv, kernels) in [
            ("causal", 0, Plain),
            ("tau", 0, Plain),
            ("causal", 1, Plain),
            ("tau", 1, Plain),
            ("tau", 0, Fused),
            ("tau", 1, Fused),
            ("sliding", 0, Plain),
            ("tau-full", 0, Plain),
            ("tau-full", 0, Fused),
            ("tau-multi", 1, Plain),
            ("tau-bias", 1, Plain),
        ] {
            let (_, mut g) = twins(attn, kv);
            g.kernels = kernels; // fused: queries after a cached prefix (Tq < Tk) over views of the cache
            let idx = Tensor::randint(1024, [2, 40], (Kind::Int64, g.lap.device()));
            let full = tch::no_grad(|| g.hidden(&idx, None));
            let mut cache = Cache::new(g.cfg.n_layer, 40);
            let mut parts = vec![tch::no_grad(|| g.forward(&idx.narrow(1, 0, 30), Some(&mut cache), None))];
            for i in 30..40 {
                parts.push(tch::no_grad(|| g.forward(&idx.narrow(1, i, 1), Some(&mut cache), None)));
            }
            assert!(rel(&full, &Tensor::cat(&parts, 1)) < 2e-2, "{attn}/{kv}");
            assert_eq!(cache.bytes(), cache_bytes_formula(&g.cfg, Kind::BFloat16, 2, 40));
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn tau_attention_on_gpu_equals_cpu() {
        let dev = cuda();
        let (lq, lk) = (
            Tensor::rand([2, 3, 100], (Kind::Float, Device::Cpu)),
            Tensor::rand([2, 3, 100], (Kind::Float, Device::Cpu)),
        );
        let (v, it) =
            (Tensor::randn([2, 3, 100, 16], (Kind::Float, Device::Cpu)), Tensor::from_slice(&[1.0f32, 5.0, 20.0]));
        let (a, b) =
            (tau_attention(&lq, &lk, &v, &it), tau_attention(&lq.to(dev), &lk.to(dev), &v.to(dev), &it.to(dev)));
        assert!(rel(&a, &b) < 1e-5);
    }

    // The output and the gradients (λq, λk, V, inv_temp) of one tau attention for the loss Σ output·probe.
    fn attention_and_grads(
        f: fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Tensor,
        lq: &Tensor,
        lk: &Tensor,
        v: &Tensor,
        it: &Tensor,
        probe: &Tensor,
    ) -> Vec<Tensor> {
        let x: Vec<Tensor> = [lq, lk, v, it].iter().map(|t| t.detach().copy().set_requires_grad(true)).collect();
        let y = f(&x[0], &x[1], &x[2], &x[3]);
        (y.to_kind(Kind::Float) * probe).sum(Kind::Float).backward();
        std::iter::once(y.detach()).chain(x.iter().map(Tensor::grad)).collect()
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn fused_tau_attention_matches_the_plain_path() {
        let dev = cuda();
        let f32 = (Kind::Float, dev);
        let names = ["output", "dλq", "dλk", "dV", "dinv_temp"];
        // (B, H, Tq, Tk, D): one tile; ragged tiles; decoding after a prefix (Tq < Tk); D 32 and 128; a speedrun layer
        for (n, (b, h, tq, tk, d)) in [
            (2, 3, 64, 64, 64),
            (1, 2, 1000, 1000, 64),
            (2, 2, 77, 77, 64),
            (2, 3, 1, 300, 64),
            (1, 1, 5, 300, 64),
            (2, 2, 130, 130, 32),
            (1, 2, 200, 200, 128),
            (4, 6, 1024, 1024, 64),
        ]
        .into_iter()
        .enumerate()
        {
            let shape = format!("B {b} H {h} Tq {tq} Tk {tk} D {d}");
            let (lq, lk) = (Tensor::rand([b, h, tq], f32), Tensor::rand([b, h, tk], f32));
            let it = Tensor::from_slice(&[1.0f32, 20.0, 5.0, 60.0, 2.0, 10.0][..h as usize]).to(dev);
            let (v, probe) = (Tensor::randn([b, h, tk, d], f32), Tensor::randn([b, h, tq, d], f32));
            let plain = attention_and_grads(tau_attention, &lq, &lk, &v, &it, &probe);
            let fused = attention_and_grads(tau_attention_fused, &lq, &lk, &v, &it, &probe);
            for (name, (p, f)) in names.iter().zip(plain.iter().zip(&fused)) {
                assert!(rel(p, f) < 1e-4, "fp32, {shape}: {name} differs by {}", rel(p, f));
            }
            // bf16 V: both paths against fp32 arithmetic on the same rounded inputs; the fused one is no worse than
            // bf16 allows. Every other shape, V is a [B,H,T,D] view of [B,T,H,D] memory, as the model's is.
            let vb = v.to_kind(Kind::BFloat16);
            let vb = if n % 2 == 1 { vb.transpose(1, 2).contiguous().transpose(1, 2) } else { vb };
            let pb = probe.to_kind(Kind::BFloat16).to_kind(Kind::Float);
            let exact = attention_and_grads(tau_attention, &lq, &lk, &vb.to_kind(Kind::Float), &it, &pb);
            let plain = attention_and_grads(tau_attention, &lq, &lk, &vb, &it, &pb);
            let fused = attention_and_grads(tau_attention_fused, &lq, &lk, &vb, &it, &pb);
            for (name, ((e, p), f)) in names.iter().zip(exact.iter().zip(&plain).zip(&fused)) {
                let (ep, ef) = (rel(e, p), rel(e, f));
                assert!(ef < (2.0 * ep).max(1e-2), "bf16, {shape}: {name} off by {ef} (the plain path by {ep})");
            }
        }
    }

    // A bare head [V, 128] on the GPU with weights × 50: logits of σ ≈ 11 for unit hidden states, so that the soft
    // cap's slope (1 − t²) is far from 1 and must be right.
    fn big_head(v: i64, cdt: Kind) -> Model {
        let mut m = Model::new(shape("causal", [1, 2, 0, 128, 8, v]), cuda(), cdt, None);
        tch::no_grad(|| {
            let w = &mut m.params[0].1;
            let big = &*w * 50.0;
            w.copy_(&big)
        });
        m
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn fused_head_matches_the_plain_chunked_head() {
        // V: a multiple of the 16-byte vector, and two rows that start off it (bf16 and fp32); N: one row, a few, and
        // 300 = two chunks of 128 and a ragged one
        for v in [1000, 50304, 50257] {
            for (cdt, grad_tol) in [(Kind::Float, 1e-5), (Kind::BFloat16, 2e-2)] {
                let mut m = big_head(v, cdt);
                let dev = m.lap.device();
                for n in [1, 7, 300] {
                    let shape = format!("V {v} N {n} {cdt:?}");
                    let h = Tensor::randn([n, 128], (cdt, dev));
                    let y = Tensor::randint(v, [n], (Kind::Int64, dev));
                    let _ = y.get(n - 1).fill_(v - 1); // the last column: a row's scalar tail
                    let _ = y.get(0).fill_(0);
                    let mut head = |kernels: Kernels, grad: bool| {
                        m.kernels = kernels;
                        m.head_chunked(&h, &y, 128, grad)
                    };
                    let (l0, g0) = head(Kernels::Plain, true);
                    let (l1, g1) = head(Kernels::Fused, true);
                    let (l2, _) = head(Kernels::Fused, false);
                    let (l0, l1, l2) = (l0.double_value(&[]), l1.double_value(&[]), l2.double_value(&[]));
                    // the same logits (one matmul) in both paths and fp32 arithmetic after it: the loss agrees to fp32
                    // rounding
                    assert!(
                        (l0 - l1).abs() < 1e-5 * l0 && l1 == l2,
                        "{shape}: loss {l0} (plain) vs {l1} (fused) and {l2} (fused, no gradient)"
                    );
                    let ((dh0, dw0), (dh1, dw1)) = (g0.unwrap(), g1.unwrap());
                    for (name, a, b) in [("dh", &dh0, &dh1), ("dwte", &dw0, &dw1)] {
                        assert!(rel(a, b) < grad_tol, "{shape}: {name} differs by {}", rel(a, b));
                    }
                }
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn fused_cross_entropy_scales_its_gradient_and_marks_bad_targets() {
        let dev = cuda();
        for kind in [Kind::Float, Kind::BFloat16] {
            let z = (Tensor::randn([5, 1003], (Kind::Float, dev)) * 20.0).to_kind(kind);
            let y = Tensor::from_slice(&[0i64, 1002, -1, 1003, 7]).to(dev); // rows 2 and 3: outside [0, V)
            let bad = Tensor::from_slice(&[false, false, true, true, false]).to(dev);
            let good = Tensor::from_slice(&[0i64, 1, 4]).to(dev);
            let (mut g1, mut g2, mut kept) = (z.copy(), z.copy(), z.copy());
            let (l1, l2, l0) = (
                softcap_ce_fused(&mut g1, &y, 1.0, true),
                softcap_ce_fused(&mut g2, &y, 0.5, true),
                softcap_ce_fused(&mut kept, &y, 1.0, false),
            );
            assert!(l1.isnan().equal(&bad) && g1.isnan().all_dim(1, false).equal(&bad), "{kind:?}: NaN rows");
            assert!(
                l1.index_select(0, &good).equal(&l2.index_select(0, &good))
                    && l1.index_select(0, &good).equal(&l0.index_select(0, &good)),
                "{kind:?}: losses"
            );
            // × 0.5 is exact, before and after rounding to bf16
            assert!((g1.index_select(0, &good) * 0.5).equal(&g2.index_select(0, &good)), "{kind:?}: scale");
            assert!(kept.equal(&z), "{kind:?}: without the gradient z stays");
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn a_model_with_fused_kernels_is_the_same_model_on_gpu() {
        // causal: the block kernels and the head; tau: attention too
        for (attn, kv) in [("causal", 0), ("tau", 0), ("tau-lt", 0), ("tau", 2), ("tau-full", 0), ("tau-bias", 0)] {
            let (_, mut g) = twins(attn, kv);
            let dev = g.lap.device();
            let (x, y) = (
                Tensor::randint(1024, [3, 50], (Kind::Int64, dev)),
                Tensor::randint(1024, [3, 50], (Kind::Int64, dev)),
            ); // 50: a ragged tile
            g.cdt = Kind::Float;
            g.kernels = Kernels::Plain;
            let (lt, gt) = g.loss_and_grads(&x, &y, 0, 0); // fp32 through the plain path: the truth for bf16's bounds
            for cdt in [Kind::Float, Kind::BFloat16] {
                g.cdt = cdt;
                g.kernels = Kernels::Plain;
                let (l0, g0) = g.loss_and_grads(&x, &y, 0, 0);
                g.kernels = Kernels::Fused;
                // head_chunk 0: all 150 rows in one kernel call; 64: two chunks and a ragged one
                for head_chunk in [0, 64] {
                    let (l1, g1) = g.loss_and_grads(&x, &y, 0, head_chunk);
                    let what = format!("{attn}/{kv} {cdt:?} head chunk {head_chunk}");
                    if cdt == Kind::Float {
                        // fp32: the same numbers up to rounding
                        assert!((l0 - l1).abs() < 1e-5 * l0, "{what}: loss {l0} vs {l1}");
                        for ((n, _), (a, b)) in g.params.iter().zip(g0.iter().zip(&g1)) {
                            assert!(rel(a, b) < 1e-3, "{what}: {n} grad differs by {}", rel(a, b));
                        }
                    } else {
                        // bf16: the fused kernels round once where the plain ops round at every step, so they are held
                        // to fp32 as the plain path is: at most twice its distance (tau's non-smooth |λq − λk| makes
                        // that distance large for qkv; see bf16_gpu_loss_and_gradients_match_f32_cpu), and 2e-3 / 5% in
                        // any case
                        assert!(
                            (l1 - lt).abs() < (2.0 * (l0 - lt).abs()).max(2e-3 * lt),
                            "{what}: loss {l1}, plain {l0}, fp32 {lt}"
                        );
                        for ((((n, _), t), a), b) in g.params.iter().zip(&gt).zip(&g0).zip(&g1) {
                            let (plain, fused) = (rel(t, a), rel(t, b));
                            assert!(
                                fused < (2.0 * plain).max(5e-2),
                                "{what}: {n} grad {fused} from fp32 (plain bf16: {plain})"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn fused_tau_bias_matches_the_plain_ops() {
        let dev = cuda();
        // a ragged square, queries after a cached prefix, one decoding query
        for (tq, tk) in [(50, 50), (7, 300), (1, 33)] {
            let opts = (Kind::Float, dev);
            let (lq, lk, a) =
                (Tensor::rand([2, 3, tq], opts), Tensor::rand([2, 3, tk], opts), Tensor::rand([3], opts) * 20.0);
            let probe = Tensor::randn([2, 3, tq, tk], opts);
            let masked = future(tq, tk, dev);
            let run = |fused: bool| {
                let xs: Vec<Tensor> = [&lq, &lk, &a].iter().map(|x| x.detach().set_requires_grad(true)).collect();
                let bias = if fused {
                    tau_bias_fused(&xs[0], &xs[1], &xs[2])
                } else {
                    ((xs[0].unsqueeze(-1) - xs[1].unsqueeze(-2)).abs() * xs[2].view([1, -1, 1, 1]).neg())
                        .masked_fill(&masked, f64::NEG_INFINITY)
                        .to_kind(Kind::BFloat16)
                };
                let finite = bias.to_kind(Kind::Float).masked_fill(&masked, 0.0);
                (&finite * &probe).sum(Kind::Float).backward();
                (bias, xs.iter().map(|x| x.grad()).collect::<Vec<_>>())
            };
            let ((b0, g0), (b1, g1)) = (run(false), run(true));
            assert_eq!(b1.size(), [2, 3, tq, tk]);
            assert_eq!(b1.kind(), Kind::BFloat16);
            let inf = |b: &Tensor| b.to_kind(Kind::Float).isinf();
            assert!(bool::try_from(inf(&b0).eq_tensor(&inf(&b1)).all()).unwrap(), "{tq}×{tk}: the masked entries");
            let f = |b: &Tensor| b.to_kind(Kind::Float).masked_fill(&masked, 0.0);
            assert!(rel(&f(&b0), &f(&b1)) < 1e-2, "{tq}×{tk}: bias differs by {}", rel(&f(&b0), &f(&b1)));
            for (n, (x, y)) in ["dλq", "dλk", "dα"].iter().zip(g0.iter().zip(&g1)) {
                assert!(rel(x, y) < 1e-2, "{tq}×{tk}: {n} differs by {}", rel(x, y));
            }
        }
    }

    // Forward and input gradient (through a random probe) of a fused op and its plain twin, as max-relative
    // differences.
    fn op_diff(
        x: &Tensor,
        fused: impl Fn(&Tensor) -> Vec<Tensor>,
        plain: impl Fn(&Tensor) -> Vec<Tensor>,
    ) -> (f64, f64) {
        let run = |f: &dyn Fn(&Tensor) -> Vec<Tensor>| {
            let xi = x.detach().set_requires_grad(true);
            let ys = f(&xi);
            // the same probes for both, drawn in logical order (randn_like would follow the strides)
            tch::manual_seed(7);
            let loss = ys
                .iter()
                .map(|y| (y.to_kind(Kind::Float) * Tensor::randn(y.size(), (Kind::Float, y.device()))).sum(Kind::Float))
                .fold(Tensor::zeros([], (Kind::Float, x.device())), |a, b| a + b);
            loss.backward();
            (ys.iter().map(|y| y.to_kind(Kind::Float).flatten(0, -1)).collect::<Vec<_>>(), xi.grad())
        };
        let ((y0, g0), (y1, g1)) = (run(&plain), run(&fused));
        (rel(&Tensor::cat(&y0, 0), &Tensor::cat(&y1, 0)), rel(&g0, &g1))
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn block_kernels_match_the_plain_ops() {
        let dev = cuda();
        // fp32 to fp32 agrees to rounding; bf16 outputs (and bf16 inputs) to bf16's
        for (xk, yk, tol) in [
            (Kind::Float, Kind::Float, 1e-5),
            (Kind::Float, Kind::BFloat16, 1e-2),
            (Kind::BFloat16, Kind::BFloat16, 2e-2),
        ] {
            for shape in [vec![3, 50, 384], vec![7, 130], vec![1, 1, 32]] {
                let x = Tensor::randn(shape.as_slice(), (xk, dev)) * 3.0;
                let (dy, dg) = op_diff(&x, |x| vec![rmsnorm_fused(x, yk)], |x| vec![rms(x).to_kind(yk)]);
                assert!(dy < tol && dg < tol, "rmsnorm {xk:?}→{yk:?} {shape:?}: forward {dy}, gradient {dg}");
                let (dy, dg) = op_diff(&x.to_kind(yk), |u| vec![relu2_fused(u)], |u| vec![u.relu().square()]);
                assert!(dy < tol && dg < tol, "relu² {yk:?} {shape:?}: forward {dy}, gradient {dg}");
                // one element in: off the 16-byte vectors, the kernel's scalar path
                let u = x.to_kind(yk).flatten(0, -1);
                let u = u.narrow(0, 1, u.size()[0] - 1);
                let (dy, dg) = op_diff(&u, |u| vec![relu2_fused(u)], |u| vec![u.relu().square()]);
                assert!(dy < tol && dg < tol, "relu² {yk:?} {shape:?} from element 1: forward {dy}, gradient {dg}");
            }
        }
        // add + RMSNorm against x + y and rms: both outputs and both inputs' gradients, with the stream's own gradient
        // (s used later) and without it (only h used, as after the last layer)
        for (yk, hk, tol) in [
            (Kind::Float, Kind::Float, 1e-5),
            (Kind::BFloat16, Kind::BFloat16, 2e-2),
            (Kind::BFloat16, Kind::Float, 1e-2),
        ] {
            for (shape, use_s) in [(vec![3, 50, 384], true), (vec![7, 130], false)] {
                let x = Tensor::randn(shape.as_slice(), (Kind::Float, dev)) * 3.0;
                let y = Tensor::randn(shape.as_slice(), (Kind::Float, dev)).to_kind(yk);
                let run = |fused: bool| {
                    let (xi, yi) = (x.detach().set_requires_grad(true), y.detach().set_requires_grad(true));
                    let (s, h) = if fused {
                        add_rmsnorm_fused(&xi, &yi, hk)
                    } else {
                        let s = &xi + &yi;
                        let h = rms(&s).to_kind(hk);
                        (s, h)
                    };
                    tch::manual_seed(7);
                    let probe = |z: &Tensor| {
                        (z.to_kind(Kind::Float) * Tensor::randn(z.size(), (Kind::Float, dev))).sum(Kind::Float)
                    };
                    let loss = if use_s { probe(&h) + probe(&s) } else { probe(&h) };
                    loss.backward();
                    [s.detach(), h.to_kind(Kind::Float), xi.grad(), yi.grad().to_kind(Kind::Float)]
                };
                let (plain, fused) = (run(false), run(true));
                for (name, (p, f)) in ["s", "h", "dx", "dy"].iter().zip(plain.iter().zip(&fused)) {
                    assert!(
                        rel(p, f) < tol,
                        "add+rmsnorm y {yk:?} h {hk:?} {shape:?} (s used: {use_s}): {name} differs by {}",
                        rel(p, f)
                    );
                }
            }
        }
        // taumode's λ (and E) against the plain ops (fp32 products of the same bf16 x): heads of 32, 64 and 128, x a
        // transposed view as q and k are, an L that is not symmetric (the backward takes L + Lᵀ); 3·50·4 rows, not a
        // multiple of 16 E and λ hold to 1e-4; the gradient is bf16 in both, so an ulp (2⁻⁸ relative) apart at most
        for d in [32, 64, 128] {
            let a = Tensor::randn([d, d], (Kind::Float, dev));
            let lap = a.matmul(&a.tr()) / d as f64 + Tensor::randn([d, d], (Kind::Float, dev)) * 0.05;
            let x = Tensor::randn([3, 50, 4, d], (Kind::BFloat16, dev)).transpose(1, 2);
            let (e0, _) = tch::no_grad(|| taumode(&x, &lap, 0.8));
            let (e1, _) = tch::no_grad(|| taumode_fused(&x, &lap, 0.8));
            let (dy, dg) = op_diff(&x, |x| vec![taumode_fused(x, &lap, 0.8).1], |x| vec![taumode(x, &lap, 0.8).1]);
            assert!(
                rel(&e0, &e1) < 1e-4 && dy < 1e-4 && dg < 1e-2,
                "taumode D {d}: E {}, λ {dy}, gradient {dg}",
                rel(&e0, &e1)
            );
        }
        // RoPE + QK-norm against the plain path: heads of 32, 64, 96 (a lane's second pair on half the lanes) and 128,
        // grouped keys, positions after a prefix, T = 50 (B·T not a multiple of a block's rows)
        for (kind, tol) in [(Kind::Float, 1e-5), (Kind::BFloat16, 3e-2)] {
            for (h, g, d, pos) in [(4, 4, 32, 0), (6, 2, 64, 0), (2, 1, 64, 7), (2, 2, 96, 3), (2, 1, 128, 0)] {
                let (cos, sin) = rope_tables(d, 64, dev);
                let y = Tensor::randn([3, 50, (h + 2 * g) * d], (kind, dev));
                let plain = |y: &Tensor| {
                    let (q, k, v) = rope_norm(y, &cos, &sin, h, g, pos);
                    vec![q, k, v]
                };
                let fused = |y: &Tensor| {
                    let (q, k, v) = rope_norm_fused(y, &cos, &sin, h, g, pos);
                    vec![q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)]
                };
                let (dy, dg) = op_diff(&y, fused, plain);
                assert!(
                    dy < tol && dg < tol,
                    "rope+qk-norm {kind:?} H {h} G {g} D {d} pos {pos}: forward {dy}, gradient {dg}"
                );
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn readback_returns_the_value_with_work_queued_behind_it() {
        let dev = cuda();
        let x = Tensor::randn([4096, 4096], (Kind::Float, dev));
        let v = x.sum(Kind::Float);
        let rb = Readback::start(&v);
        let _ = x.matmul(&x).matmul(&x); // queued after the copy
        let want = v.double_value(&[]);
        assert_eq!(rb.wait(), want);
        drop(Readback::start(&v)); // dropped unread: waits for its copy, frees its pinned buffer
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn chunked_tau_attention_matches_plain_on_gpu() {
        let dev = cuda();
        let (lq, lk) = (
            Tensor::rand([4, 6, 1024], (Kind::Float, dev)).set_requires_grad(true),
            Tensor::rand([4, 6, 1024], (Kind::Float, dev)).set_requires_grad(true),
        );
        let v = Tensor::randn([4, 6, 1024, 64], (Kind::BFloat16, dev)).set_requires_grad(true);
        let it = Tensor::full([6], 20.0, (Kind::Float, dev)).set_requires_grad(true);
        let probe = Tensor::randn([4, 6, 1024, 64], (Kind::BFloat16, dev));
        let run = |chunk: i64| {
            let y = if chunk > 0 {
                tau_attention_chunked(&lq, &lk, &v, &it, chunk)
            } else {
                tau_attention(&lq, &lk, &v, &it)
            };
            (y.to_kind(Kind::Float) * probe.to_kind(Kind::Float)).sum(Kind::Float).backward();
            let g: Vec<Tensor> = [&lq, &lk, &v, &it].iter().map(|t| t.grad().copy()).collect();
            [&lq, &lk, &v, &it].iter().for_each(|t| t.shallow_clone().zero_grad());
            (y.detach(), g)
        };
        let (y0, g0) = run(0);
        let (y1, g1) = run(128);
        assert!(rel(&y0, &y1) < 1e-2);
        for (i, (a, b)) in g0.iter().zip(&g1).enumerate() {
            assert!(rel(a, b) < 2e-2, "gradient {i}: {}", rel(a, b));
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn corpus_laplacian_is_the_same_on_gpu_and_cpu() {
        let dev = cuda();
        let toks: Vec<u16> = fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tiny"))
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .flat_map(|p| tokenizer().encode_ordinary(&fs::read_to_string(p).unwrap()))
            .map(|t| t as u16)
            .collect();
        let cfg = LapConfig { k_items: 1024, ..LapConfig::default() };
        let (c, g) = (corpus_laplacian(&toks, &cfg, Device::Cpu).unwrap(), corpus_laplacian(&toks, &cfg, dev).unwrap());
        assert!(rel(&c, &g) < 1e-3, "the build must not depend on the device: {}", rel(&c, &g));
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn memory_peaks_see_an_allocation() {
        let dev = cuda();
        reset_memory_peaks(dev);
        let t = Tensor::zeros([256, 1024, 1024], (Kind::Float, dev)); // 1 GiB
        let (alloc, reserved) = memory_peaks(dev).unwrap();
        assert!(alloc >= 1024.0 && reserved >= alloc, "{alloc} {reserved}");
        drop(t);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn decode_cache_allocation_matches_the_formula() {
        for (attn, kv) in [("causal", 0), ("tau", 0), ("tau", 2), ("tau-bias", 2), ("tau-multi", 0)] {
            let (_, g) = twins(attn, kv);
            let prompt = Tensor::randint(1024, [3, 10], (Kind::Int64, g.lap.device()));
            let (_, steps, bytes, allocated) = tools::decode_timed(&g, &prompt, 20);
            assert_eq!(steps.len(), 20);
            let formula = cache_bytes_formula(&g.cfg, g.cdt, 3, 30);
            assert_eq!(bytes, formula, "{attn}/{kv}");
            // the caching allocator rounds each block up to 512 bytes: one a tensor the variant caches, a layer
            let slack = 512 * 3 * g.cfg.n_layer;
            assert!(
                allocated.is_some_and(|a| a >= formula && a < formula + slack),
                "{attn}/{kv}: {allocated:?} vs {formula}"
            );
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn nccl_group_of_one_reduces() {
        let dev = cuda();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port() as i64;
        let d = Dist::init(&DistEnv { rank: 0, world: 1, local_rank: 0, addr: "127.0.0.1".into(), port }, 30.0, true)
            .unwrap();
        let t = Tensor::from_slice(&[1.5f32, -2.0]).to(dev);
        d.all_reduce(std::slice::from_ref(&t), true).unwrap();
        d.all_reduce(std::slice::from_ref(&t), false).unwrap();
        d.sync().unwrap();
        assert_eq!(Vec::<f32>::try_from(t.to(Device::Cpu)).unwrap(), vec![1.5, -2.0]);
    }
}

// No file a user can pass panics a reader: seeded random bytes, and valid files with bytes flipped, cut, or (for a
// checkpoint) a config field set to a value out of range, through every reader of a command-line file. Cheap
// (a few hundred inputs a reader) and deterministic.
#[test]
fn file_readers_never_panic_on_mangled_input() {
    let mut rng = StdRng::seed_from_u64(20);
    let shard = tmp("fuzz-base.bin");
    write_shard(&shard, &(0..300u16).collect::<Vec<_>>()).unwrap();
    let ck = tmp("fuzz-base.safetensors");
    save_checkpoint(&small("tau", 512), &ck, Existing::Replace).unwrap();
    let npy = tmp("fuzz-base.npy");
    save_laplacian(&npy, &chain_laplacian(16)).unwrap();
    let log = tmp("fuzz-base.txt");
    let summary = r#"summary: {"variant":"causal","steps":20,"final_val_loss":5.0,"train_time_ms":100.0}"#;
    #[rustfmt::skip]
    fs::write(&log, format!("fn main() {{}}\n{}\nrustc: 1\n{}\nconfig: {{\"steps\":20,\"target_val_loss\":6.0}}\n\
        step:0/20 val_loss:10.8 train_time:0ms step_avg:0.00ms\nstep:20/20 val_loss:5.0 train_time:100ms \
        step_avg:5.00ms\n{summary}\n", "=".repeat(100), "=".repeat(100))).unwrap();
    let mangle = |rng: &mut StdRng, base: &[u8]| -> Vec<u8> {
        let mut b = base.to_vec();
        match rng.gen_range(0..4) {
            0 => (0..rng.gen_range(0..2000)).map(|_| rng.gen()).collect(),
            1 => {
                let cut = rng.gen_range(0..=b.len());
                b.truncate(cut);
                b
            }
            _ => {
                // flips, mostly in the header where the structure is
                for _ in 0..rng.gen_range(1..8) {
                    let hi = if rng.gen_bool(0.7) { b.len().min(300) } else { b.len() };
                    let i = rng.gen_range(0..hi);
                    b[i] = if rng.gen_bool(0.5) {
                        rng.gen()
                    } else {
                        *b"-0123456789,()[]{}:\"' ".get(rng.gen_range(0..22)).unwrap()
                    };
                }
                b
            }
        }
    };
    // a checkpoint whose config has one field set to a value out of range
    let ck_bytes = fs::read(&ck).unwrap();
    let odd_config = |rng: &mut StdRng| -> Vec<u8> {
        let st = safetensors::SafeTensors::deserialize(&ck_bytes).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&ck_bytes).unwrap();
        let mut c: Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["config"]).unwrap();
        let field = ["n_layer", "n_head", "n_kv_head", "n_embd", "seq_len", "vocab_size", "attn"][rng.gen_range(0..7)];
        let vals = [json!(-1), json!(0), json!(1), json!(3), json!(1i64 << 40), json!("tau-lt"), json!(null)];
        c[field] = vals[rng.gen_range(0..vals.len())].clone();
        let meta = Some(std::collections::HashMap::from([("config".to_string(), c.to_string())]));
        safetensors::tensor::serialize(st.tensors(), &meta).unwrap()
    };
    let mut panics = vec![];
    for i in 0..1200 {
        let (what, bytes) = match i % 5 {
            0 => ("shard", mangle(&mut rng, &fs::read(&shard).unwrap())),
            1 => ("checkpoint", mangle(&mut rng, &ck_bytes)),
            2 => ("checkpoint config", odd_config(&mut rng)),
            3 => ("npy", mangle(&mut rng, &fs::read(&npy).unwrap())),
            _ => ("log", mangle(&mut rng, &fs::read(&log).unwrap())),
        };
        let p = tmp(&format!("fuzz-case.{}", if what == "npy" { "npy" } else { "txt" }));
        fs::write(&p, &bytes).unwrap();
        let r = std::panic::catch_unwind(|| match what {
            "shard" => read_shard(&p).err(),
            "checkpoint" | "checkpoint config" => load_checkpoint(&p, Device::Cpu).err(),
            "npy" => load_laplacian_file(&p, 16).err(),
            _ => tools::parse_log(&p).err(),
        });
        if r.is_err() {
            panics.push(format!("case {i} ({what})"));
        }
    }
    assert!(panics.is_empty(), "panicked on {} inputs: {:?}", panics.len(), &panics[..panics.len().min(10)]);
}

// Preset::Tiny's help lists every option apply_preset changes, with the value it sets, and nothing else.
#[test]
fn tiny_preset_help_matches_apply_preset() {
    let parse = |args: &[&str]| {
        let m = Cli::command().try_get_matches_from(args).unwrap();
        let m = m.subcommand_matches("train").unwrap().clone();
        let mut a = TrainArgs::from_arg_matches(&m).unwrap();
        apply_preset(&mut a, &m, true);
        serde_json::to_value(&a).unwrap()
    };
    let (speedrun, tiny) = (parse(&["train_gpt", "train"]), parse(&["train_gpt", "train", "--preset", "tiny"]));
    let mut cmd = Cli::command();
    let help = cmd.find_subcommand_mut("train").unwrap().render_long_help().to_string();
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    let listed = help.split("tiny: ").nth(1).unwrap().split(", each unless given").next().unwrap();
    let mut want = vec![];
    for (k, v) in tiny.as_object().unwrap() {
        if k != "preset" && speedrun[k] != *v {
            want.push(format!("--{} {}", k.replace('_', "-"), v.as_str().map_or(v.to_string(), str::to_string)));
        }
    }
    let mut got: Vec<String> = listed.split(" --").skip(1).map(|f| format!("--{f}")).collect();
    (got.sort(), want.sort());
    assert_eq!(got, want, "{listed}");
}
