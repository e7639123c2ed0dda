//! The CPU runtime's results do not depend on scheduling: with busy processes competing for
//! every core (so the OS takes the pool's threads off their cores mid-chunk, and waiting threads
//! compute stalled chunks again), both real models give the very logits, bit for bit, and so the
//! same greedy tokens, as on a quiet machine.

#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Child, Command};

use gantry_engine::cpu::pool;
use gantry_engine::files::ModelFiles;
use gantry_engine::model::{Backend, LogitsFor, ModelPart, StageInput, StageOutput};

/// Processes spinning on the CPU until dropped.
struct Busy(Vec<Child>);

impl Busy {
    fn start(n: usize) -> Busy {
        Busy((0..n).map(|_| Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap()).collect())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The logits of a 40-token prompt (every position) and of 24 greedy steps after it, as bits,
/// and the greedy tokens.
fn run(model: &ModelPart, prompt: &[u32]) -> (Vec<Vec<u32>>, Vec<u32>) {
    let mut cache = model.new_cache();
    let bits = |out: StageOutput| -> Vec<f32> {
        let StageOutput::Logits(l) = out else { panic!("the whole model gives logits") };
        l.flatten_all().unwrap().to_vec1().unwrap()
    };
    let vocab = model.config.vocab_size;
    let first = bits(model.forward(StageInput::Tokens(prompt), &mut cache, LogitsFor::All).unwrap());
    let mut all = vec![first.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()];
    let argmax =
        |l: &[f32]| l.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32;
    let mut next = argmax(&first[first.len() - vocab..]);
    let mut tokens = vec![next];
    for _ in 0..24 {
        let l = bits(model.forward(StageInput::Tokens(&[next]), &mut cache, LogitsFor::Last).unwrap());
        all.push(l.iter().map(|v| v.to_bits()).collect());
        next = argmax(&l);
        tokens.push(next);
    }
    (all, tokens)
}

#[test]
fn busy_cores_change_no_bit_of_the_logits() {
    // Two threads at least, whatever this machine has: the point is threads that get preempted.
    pool::set_global_threads(pool::default_threads().max(2));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    for file in ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"] {
        let files = ModelFiles::open(&support::model_path(file)).unwrap();
        let model = files.load_part_on(0..files.config.num_layers, &Backend::Cpu, &mut |_| {}).unwrap();
        let tok = files.tokenizer().unwrap();
        let prompt = tok.encode(&"The quick brown fox jumps over the lazy dog. ".repeat(4), true, false).unwrap();
        let prompt = &prompt[..40];
        let (quiet, quiet_tokens) = run(&model, prompt);
        let stolen_before = pool::global().stolen_chunks();
        let (busy, busy_tokens) = {
            let _busy = Busy::start(cores + 1);
            run(&model, prompt)
        };
        eprintln!(
            "{file}: {} chunks computed again by a waiting thread under load; tokens {quiet_tokens:?}",
            pool::global().stolen_chunks() - stolen_before
        );
        assert_eq!(busy_tokens, quiet_tokens, "{file}: greedy tokens under load");
        for (step, (q, b)) in quiet.iter().zip(&busy).enumerate() {
            assert!(q == b, "{file}: step {step}'s logits differ under load");
        }
    }
}
