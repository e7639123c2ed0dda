//! The placement planner against small clusters built with fixtures: which node and GPU each
//! replica gets, the layers and bytes of every stage, and the reasons when none fits.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use gantry_core::placement::{
    GpuView, NodeReason, NodeView, PlacedStage, Plan, Policy, ReplicaRequest, Strategy, Unschedulable, place,
    with_margin,
};
use gantry_core::units::{GIB, format_bytes};
use gantry_core::{Catalog, Fit, ModelSpec, ServeOptions, estimate_vram, fit};

const LLAMA_70B: &str = "meta-llama/Meta-Llama-3-70B-Instruct";
const LLAMA_8B: &str = "meta-llama/Meta-Llama-3-8B-Instruct";
const SMOL_135M: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
const LLAMA_3B: &str = "meta-llama/Llama-3.2-3B-Instruct";
const MIXTRAL: &str = "mistralai/Mixtral-8x7B-Instruct-v0.1";

fn spec(id: &str) -> ModelSpec {
    Catalog::builtin().unwrap().get(id).unwrap().spec().unwrap()
}

/// Serving options the tests use: 8K context (the 3B model's 128K would dominate its need).
fn options(spec: &ModelSpec) -> ServeOptions {
    ServeOptions { context: Some(spec.context.length.min(8192)), ..ServeOptions::default() }
}

/// What `spec` needs on one GPU with a `margin` percent margin, rounded up as placement does.
fn need(spec: &ModelSpec, margin: u64) -> u64 {
    let total = estimate_vram(spec, &options(spec)).unwrap().total_bytes;
    (total as u128 * (100 + margin as u128)).div_ceil(100) as u64
}

/// A node builder: `Node::new("w1").label("zone", "a").gpu("NVIDIA H100", 80).free_gib(40)`.
struct Node(NodeView);

impl Node {
    fn new(id: &str) -> Node {
        Node(NodeView {
            id: id.into(),
            labels: BTreeMap::new(),
            gpus: Vec::new(),
            gpus_linked: false,
            host_free_bytes: 0,
        })
    }

    /// Sets the host memory the node reports free.
    fn host_gib(mut self, gib: u64) -> Node {
        self.0.host_free_bytes = gib * GIB;
        self
    }

    /// Declares the node's GPUs linked (NVLink).
    fn linked(mut self) -> Node {
        self.0.gpus_linked = true;
        self
    }

    fn label(mut self, key: &str, value: &str) -> Node {
        self.0.labels.insert(key.into(), value.into());
        self
    }

    /// Adds an empty GPU of `gib` GiB.
    fn gpu(mut self, name: &str, gib: u64) -> Node {
        let index = self.0.gpus.len() as u32;
        self.0.gpus.push(GpuView { index, name: name.into(), total_bytes: gib * GIB, free_bytes: gib * GIB });
        self
    }

    /// Sets the free memory of the GPU added last.
    fn free_gib(self, gib: u64) -> Node {
        self.free_bytes(gib * GIB)
    }

    fn free_bytes(mut self, bytes: u64) -> Node {
        self.0.gpus.last_mut().expect("a GPU was added").free_bytes = bytes;
        self
    }

    fn build(self) -> NodeView {
        self.0
    }
}

/// Places one replica of `spec` with `policy`, a 5% margin and `replicas` already placed.
fn run(
    nodes: &[NodeView],
    spec: &ModelSpec,
    policy: &Policy,
    replicas: &BTreeMap<String, u32>,
) -> Result<Plan, Unschedulable> {
    run_with_margin(nodes, spec, policy, replicas, 5)
}

fn run_with_margin(
    nodes: &[NodeView],
    spec: &ModelSpec,
    policy: &Policy,
    replicas: &BTreeMap<String, u32>,
    margin_percent: u64,
) -> Result<Plan, Unschedulable> {
    let req = ReplicaRequest {
        spec,
        options: options(spec),
        policy,
        margin_percent,
        replicas_on_node: replicas,
        measured_bytes: None,
    };
    place(nodes, &req).unwrap()
}

fn binpack() -> Policy {
    Policy::default()
}

fn spread() -> Policy {
    Policy { strategy: Strategy::Spread, ..Policy::default() }
}

fn one_gpu(plan: Result<Plan, Unschedulable>) -> PlacedStage {
    match plan {
        Ok(Plan::OneGpu { stage }) => stage,
        other => panic!("expected one GPU, got {other:?}"),
    }
}

fn unschedulable(plan: Result<Plan, Unschedulable>) -> Unschedulable {
    match plan {
        Err(u) => u,
        Ok(plan) => panic!("expected unschedulable, got {plan:?}"),
    }
}

/// Subtracts a plan's stages from the GPUs' free memory, as the controller's reservation does.
fn reserve(nodes: &mut [NodeView], plan: &Plan) {
    for s in plan.stages() {
        let node = nodes.iter_mut().find(|n| n.id == s.node).unwrap();
        let gpu = node.gpus.iter_mut().find(|g| g.index == s.gpu).unwrap();
        assert!(s.bytes <= gpu.free_bytes, "{} gpu:{} overcommitted: {} > {}", s.node, s.gpu, s.bytes, gpu.free_bytes);
        gpu.free_bytes -= s.bytes;
    }
}

/// Where each stage runs, as `(node, gpu, layers)`.
fn layout(plan: &Plan) -> Vec<(&str, u32, std::ops::Range<u64>)> {
    plan.stages().iter().map(|s| (s.node.as_str(), s.gpu, s.layers.clone())).collect()
}

#[test]
fn binpack_picks_the_tightest_gpu_that_fits() {
    let llama = spec(LLAMA_8B);
    let nodes = [
        Node::new("n1").gpu("NVIDIA H100", 80).build(),
        Node::new("n2").gpu("NVIDIA A10G", 24).free_gib(17).gpu("NVIDIA L40S", 48).free_gib(20).build(),
        Node::new("n3").gpu("NVIDIA L40S", 48).free_gib(30).build(),
    ];
    // 16.8 GiB + 5% = 17.7 GiB: the 17 GiB GPU is too small, the 20 GiB one the tightest.
    let stage = one_gpu(run(&nodes, &llama, &binpack(), &BTreeMap::new()));
    assert_eq!((stage.node.as_str(), stage.gpu, stage.layers.clone()), ("n2", 1, 0..32));
    assert_eq!(stage.bytes, need(&llama, 5));
    assert_eq!(format_bytes(stage.bytes), "17.7 GiB");
    // Spread takes the emptiest GPU instead.
    let stage = one_gpu(run(&nodes, &llama, &spread(), &BTreeMap::new()));
    assert_eq!((stage.node.as_str(), stage.gpu), ("n1", 0));
}

#[test]
fn a_measurement_replaces_the_estimate_and_a_gpu_that_fits_only_the_estimate_is_refused_with_both() {
    let llama = spec(LLAMA_8B);
    let estimate = estimate_vram(&llama, &options(&llama)).unwrap().total_bytes;
    let measured = estimate + (2 << 30);
    let nodes = [Node::new("n1").gpu("NVIDIA L40S", 48).free_gib(19).build()];
    let place_with = |nodes: &[NodeView], m: Option<u64>| {
        let replicas = BTreeMap::new();
        let policy = binpack();
        let req = ReplicaRequest {
            spec: &llama,
            options: options(&llama),
            policy: &policy,
            margin_percent: 5,
            replicas_on_node: &replicas,
            measured_bytes: m,
        };
        place(nodes, &req).unwrap()
    };
    // 17.7 GiB by the estimate fits 19 GiB; 19.8 GiB as measured does not.
    assert!(place_with(&nodes, None).is_ok());
    let u = unschedulable(place_with(&nodes, Some(measured)));
    assert_eq!(u.needs_bytes, with_margin(measured, 5));
    assert!(
        u.to_string().starts_with(&format!(
            "needs {} as measured (estimated {}); n1: ",
            format_bytes(with_margin(measured, 5)),
            format_bytes(need(&llama, 5))
        )),
        "{u}"
    );
    // Where it fits, the measurement is what is reserved.
    let roomy = [Node::new("n1").gpu("NVIDIA L40S", 48).build()];
    assert_eq!(one_gpu(place_with(&roomy, Some(measured))).bytes, with_margin(measured, 5));
    // A split is scaled up as the measurement says: two 12 GiB GPUs hold the estimate split, not
    // twice as much as measured.
    let pair = [Node::new("n1").gpu("NVIDIA A10G", 12).gpu("NVIDIA A10G", 12).build()];
    assert!(place_with(&pair, None).is_ok());
    assert!(place_with(&pair, Some(estimate * 2)).is_err());
}

#[test]
fn spread_puts_three_replicas_on_three_nodes_and_binpack_stacks_them() {
    let smol = spec(SMOL_135M);
    let cluster: Vec<NodeView> =
        ["n1", "n2", "n3"].iter().map(|id| Node::new(id).gpu("NVIDIA L4", 24).build()).collect();
    for (policy, want) in [(spread(), vec!["n1", "n2", "n3"]), (binpack(), vec!["n1", "n1", "n1"])] {
        let mut nodes = cluster.clone();
        let mut replicas = BTreeMap::new();
        let mut placed = Vec::new();
        for _ in 0..3 {
            let plan = run(&nodes, &smol, &policy, &replicas).unwrap();
            reserve(&mut nodes, &plan);
            let node = plan.stages()[0].node.clone();
            *replicas.entry(node.clone()).or_insert(0) += 1;
            placed.push(node);
        }
        assert_eq!(placed, want, "{:?}", policy.strategy);
    }
}

#[test]
fn spread_prefers_the_node_with_fewer_replicas_over_more_free_memory() {
    let smol = spec(SMOL_135M);
    let nodes = [Node::new("n1").gpu("NVIDIA H100", 80).build(), Node::new("n2").gpu("NVIDIA T4", 16).build()];
    let replicas = BTreeMap::from([("n1".to_string(), 1)]);
    let stage = one_gpu(run(&nodes, &smol, &spread(), &replicas));
    assert_eq!((stage.node.as_str(), stage.gpu), ("n2", 0));
}

#[test]
fn ties_break_by_node_id_then_gpu_index() {
    let smol = spec(SMOL_135M);
    // Given out of order; every GPU equal.
    let nodes = [
        Node::new("w2").gpu("NVIDIA L4", 24).gpu("NVIDIA L4", 24).build(),
        Node::new("w1").gpu("NVIDIA L4", 24).gpu("NVIDIA L4", 24).build(),
    ];
    for policy in [binpack(), spread()] {
        let stage = one_gpu(run(&nodes, &smol, &policy, &BTreeMap::new()));
        assert_eq!((stage.node.as_str(), stage.gpu), ("w1", 0), "{:?}", policy.strategy);
    }
}

#[test]
fn node_selector_keeps_only_matching_nodes_and_says_why_others_are_out() {
    let llama = spec(LLAMA_8B);
    let nodes = [
        Node::new("w1").label("zone", "a").gpu("NVIDIA A10G", 24).build(),
        Node::new("w2").label("zone", "b").label("tier", "spot").gpu("NVIDIA A10G", 24).build(),
        Node::new("w3").label("zone", "b").gpu("NVIDIA T4", 16).build(),
    ];
    let policy = Policy { node_selector: BTreeMap::from([("zone".into(), "b".into())]), ..binpack() };
    let stage = one_gpu(run(&nodes, &llama, &policy, &BTreeMap::new()));
    assert_eq!(stage.node, "w2");

    let policy = Policy {
        node_selector: BTreeMap::from([("zone".into(), "b".into()), ("tier".into(), "spot".into())]),
        ..binpack()
    };
    let full = [
        nodes[0].clone(),
        Node::new("w2").label("zone", "b").label("tier", "spot").gpu("NVIDIA A10G", 24).free_gib(10).build(),
        nodes[2].clone(),
    ];
    let u = unschedulable(run(&full, &llama, &policy, &BTreeMap::new()));
    assert_eq!(
        u.reasons,
        vec![
            NodeReason { node: "w1".into(), reason: "labels do not match tier=spot,zone=b".into() },
            NodeReason {
                node: "w2".into(),
                reason: "1×24.0 GiB, 10.0 GiB free on the best GPU, needs 17.7 GiB".into()
            },
            NodeReason { node: "w3".into(), reason: "labels do not match tier=spot".into() },
        ]
    );
}

#[test]
fn gpu_name_keeps_only_matching_gpus_case_insensitively() {
    let llama = spec(LLAMA_8B);
    let nodes = [
        Node::new("w1").gpu("NVIDIA A10G", 24).build(),
        Node::new("w2").gpu("NVIDIA A10G", 24).gpu("NVIDIA H100 80GB HBM3", 80).build(),
    ];
    // Binpack would take an A10G; the policy asks for an H100.
    let policy = Policy { gpu_name: "h100".into(), ..binpack() };
    let stage = one_gpu(run(&nodes, &llama, &policy, &BTreeMap::new()));
    assert_eq!((stage.node.as_str(), stage.gpu), ("w2", 1));

    let u = unschedulable(run(&nodes[..1], &llama, &policy, &BTreeMap::new()));
    assert_eq!(
        u.reasons,
        vec![NodeReason { node: "w1".into(), reason: "no GPU named like \"h100\" (has NVIDIA A10G)".into() }]
    );
}

#[test]
fn a_node_without_gpus_is_named_in_the_reasons() {
    let llama = spec(LLAMA_8B);
    let nodes = [Node::new("cpu-only").build(), Node::new("w1").gpu("NVIDIA T4", 16).build()];
    let u = unschedulable(run(&nodes, &llama, &binpack(), &BTreeMap::new()));
    assert_eq!(u.needs_bytes, need(&llama, 5));
    assert_eq!(
        u.to_string(),
        "needs 17.7 GiB; cpu-only: no GPUs; w1: 1×16.0 GiB, 16.0 GiB free on the best GPU, needs 17.7 GiB"
    );
}

#[test]
fn llama_3_70b_on_one_80_gib_gpu_is_unschedulable_with_the_numbers() {
    let llama = spec(LLAMA_70B);
    let nodes = [Node::new("w1").gpu("NVIDIA H100", 80).free_gib(78).build()];
    let u = unschedulable(run(&nodes, &llama, &binpack(), &BTreeMap::new()));
    // 137.2 GiB estimated, 144.0 GiB with the 5% margin.
    assert_eq!(u.needs_bytes, need(&llama, 5));
    assert_eq!(format_bytes(u.needs_bytes), "144.0 GiB");
    assert!(!u.fits_across_nodes);
    assert_eq!(u.to_string(), "needs 144.0 GiB; w1: 1×80.0 GiB, 78.0 GiB free on the best GPU, needs 144.0 GiB");
}

#[test]
fn mixtral_too_big_for_a_24_gib_gpu_keeps_its_experts_in_the_nodes_host_memory() {
    let mixtral = spec(MIXTRAL);
    let experts = mixtral.weights.layout.total_expert_bytes();
    // 32 layers × 8 experts × 3 matrices of 4096 × 14336, in bf16.
    assert_eq!(experts, 32 * 8 * 3 * 4096 * 14336 * 2);
    let nodes = [Node::new("w1").gpu("NVIDIA L4", 24).host_gib(128).build()];
    let stage = one_gpu(run(&nodes, &mixtral, &binpack(), &BTreeMap::new()));
    assert_eq!((stage.node.as_str(), stage.gpu, stage.layers.clone()), ("w1", 0, 0..32));
    assert_eq!(stage.experts_on_host, experts);
    // The GPU keeps the rest: the whole estimate less the experts (and their fragmentation
    // allowance), plus the margin.
    let host = gantry_core::shard::experts_on_host(&mixtral, &options(&mixtral)).unwrap().unwrap();
    assert_eq!(host.host_bytes, experts);
    assert_eq!(stage.bytes, (host.stage.total_bytes as u128 * 105).div_ceil(100) as u64);
    assert!(stage.bytes <= 24 * GIB, "{}", format_bytes(stage.bytes));
    assert_eq!(
        host.stage.total_bytes + experts + experts / 100 * 2,
        estimate_vram(&mixtral, &options(&mixtral)).unwrap().total_bytes
    );
}

#[test]
fn experts_go_to_host_memory_only_when_it_is_reported_and_large_enough() {
    let mixtral = spec(MIXTRAL);
    let experts = mixtral.weights.layout.total_expert_bytes();
    for (host_gib, why) in [(0, "not reported"), (experts / GIB, "no room for the margin")] {
        let nodes = [Node::new("w1").gpu("NVIDIA L4", 24).host_gib(host_gib).build()];
        let u = unschedulable(run(&nodes, &mixtral, &binpack(), &BTreeMap::new()));
        assert_eq!(u.needs_bytes, need(&mixtral, 5), "{why}");
    }
    // A dense model has no experts to move, however much host memory there is.
    let llama = spec(LLAMA_70B);
    let nodes = [Node::new("w1").gpu("NVIDIA H100", 80).host_gib(1024).build()];
    unschedulable(run(&nodes, &llama, &binpack(), &BTreeMap::new()));
}

#[test]
fn mixtral_on_two_80_gib_gpus_is_split_over_them_rather_than_sent_to_the_host() {
    let mixtral = spec(MIXTRAL);
    let nodes = [Node::new("w1").gpu("NVIDIA H100", 80).gpu("NVIDIA H100", 80).host_gib(512).build()];
    let plan = run(&nodes, &mixtral, &binpack(), &BTreeMap::new()).unwrap();
    assert_eq!(layout(&plan), vec![("w1", 0, 0..16), ("w1", 1, 16..32)]);
    assert!(plan.stages().iter().all(|s| s.experts_on_host == 0));
    // Linked GPUs do not split experts tensor-parallel either: the pipeline split stands.
    let linked = [Node::new("w1").linked().gpu("NVIDIA H100", 80).gpu("NVIDIA H100", 80).build()];
    let plan = run(&linked, &mixtral, &binpack(), &BTreeMap::new()).unwrap();
    assert!(plan.stages().iter().all(|s| s.tp == 0), "{plan:?}");
}

#[test]
fn llama_3_70b_on_two_80_gib_gpus_splits_its_layers_over_both() {
    let llama = spec(LLAMA_70B);
    let nodes = [Node::new("w1").gpu("NVIDIA H100", 80).gpu("NVIDIA H100", 80).build()];
    let plan = run(&nodes, &llama, &binpack(), &BTreeMap::new()).unwrap();
    let Plan::MultiGpu { node, stages } = &plan else { panic!("expected a split on one node: {plan:?}") };
    assert_eq!(node, "w1");
    assert_eq!(layout(&plan), vec![("w1", 0, 0..40), ("w1", 1, 40..80)]);
    // Each stage reserves shard's estimate for its layers plus 5%, within its GPU.
    let room = 80 * GIB * 100 / 105;
    let Fit::Split { stages: shard } = fit(&llama, &options(&llama), &[room, room]).unwrap() else { panic!() };
    for (placed, planned) in stages.iter().zip(&shard) {
        assert_eq!(placed.bytes, (planned.total_bytes as u128 * 105).div_ceil(100) as u64);
        assert!(placed.bytes <= 80 * GIB);
    }
    assert_eq!(format_bytes(stages[0].bytes), "72.3 GiB");
    assert!(plan.total_bytes() > need(&llama, 5), "a split costs more than one device");
}

#[test]
fn llama_3_70b_on_linked_gpus_is_split_tensor_parallel_and_reserves_each_ranks_share() {
    let llama = spec(LLAMA_70B);
    // 64 heads over 8 KV heads, MLP 28,672: 2, 4 and 8 ranks all divide it.
    let nodes = [Node::new("w1").gpu("NVIDIA H100", 80).gpu("NVIDIA H100", 80).gpu("NVIDIA H100", 80).linked().build()];
    let plan = run(&nodes, &llama, &binpack(), &BTreeMap::new()).unwrap();
    let Plan::MultiGpu { node, stages } = &plan else { panic!("expected one node: {plan:?}") };
    assert_eq!(node, "w1");
    assert_eq!(layout(&plan), vec![("w1", 0, 0..80), ("w1", 1, 0..80)], "two ranks, every layer on each");
    assert!(stages.iter().all(|s| s.tp == 2));
    let room = 80 * GIB * 100 / 105;
    let Fit::TensorParallel { ranks } = gantry_core::fit_on(&llama, &options(&llama), &[room; 3], true).unwrap() else {
        panic!("linked GPUs take a tensor-parallel split")
    };
    let rank = gantry_core::shard::rank_bytes(&llama, &options(&llama), 2).unwrap().unwrap();
    assert_eq!(ranks.len(), 2);
    assert_eq!(ranks[0].total_bytes, rank.total());
    for s in stages {
        assert_eq!(s.bytes, (rank.total() as u128 * 105).div_ceil(100) as u64);
    }
    // Half the weights and KV cache per rank, plus the overhead and activations each device has.
    let whole = estimate_vram(&llama, &options(&llama)).unwrap();
    assert!(rank.weights.abs_diff(whole.weights_bytes / 2) < 1 << 20, "{} vs {}", rank.weights, whole.weights_bytes);
    assert_eq!(rank.kv_cache, whole.kv_cache_bytes / 2);
    // Unlinked, the same GPUs split it layer by layer.
    let unlinked = [Node::new("w1").gpu("NVIDIA H100", 80).gpu("NVIDIA H100", 80).gpu("NVIDIA H100", 80).build()];
    let plan = run(&unlinked, &llama, &binpack(), &BTreeMap::new()).unwrap();
    assert_eq!(layout(&plan), vec![("w1", 0, 0..40), ("w1", 1, 40..80)]);
    assert!(plan.stages().iter().all(|s| s.tp == 0));
}

#[test]
fn a_model_whose_heads_do_not_divide_falls_back_to_layers_on_linked_gpus() {
    // SmolLM2-135M: 9 heads over 3 KV heads; two ranks cannot split it, three can.
    let smol = spec(SMOL_135M);
    let need = need(&smol, 5);
    let gib = need * 8 / 10;
    let node = |n: usize| {
        let mut b = Node::new("w1");
        for _ in 0..n {
            b = b.gpu("NVIDIA T4", 16).free_bytes(gib);
        }
        b.linked().build()
    };
    let two = run(&[node(2)], &smol, &binpack(), &BTreeMap::new()).unwrap();
    assert!(two.stages().iter().all(|s| s.tp == 0), "{two:?}");
    assert_eq!(two.stages().len(), 2);
    let three = run(&[node(3)], &smol, &binpack(), &BTreeMap::new()).unwrap();
    let tp: Vec<u32> = three.stages().iter().map(|s| s.tp).collect();
    // Two pipeline stages fit first only when linked GPUs cannot take the split: here 3 ranks can.
    assert_eq!(tp, vec![3, 3, 3], "{three:?}");
    assert_eq!(gantry_core::placement::segments(three.stages()).len(), 1);
}

#[test]
fn linked_nodes_split_tensor_parallel_within_and_pipeline_across() {
    let llama = spec(LLAMA_70B);
    let node = |id: &str| Node::new(id).gpu("NVIDIA L40S", 48).gpu("NVIDIA L40S", 48).linked().build();
    let nodes = [node("b"), node("a")];
    let policy = Policy { allow_multi_node: true, ..binpack() };
    let plan = run(&nodes, &llama, &policy, &BTreeMap::new()).unwrap();
    assert!(matches!(plan, Plan::MultiNode { .. }), "{plan:?}");
    let got: Vec<(&str, u32, std::ops::Range<u64>, u32)> =
        plan.stages().iter().map(|s| (s.node.as_str(), s.gpu, s.layers.clone(), s.tp)).collect();
    assert_eq!(got, vec![("a", 0, 0..40, 2), ("a", 1, 0..40, 2), ("b", 0, 40..80, 2), ("b", 1, 40..80, 2)]);
    let segments = gantry_core::placement::segments(plan.stages());
    assert_eq!(segments.len(), 2, "two pipeline stages of two ranks each");
    for s in plan.stages() {
        assert!(s.bytes <= 48 * GIB && s.bytes > 30 * GIB, "{s:?}");
    }
    // Unlinked, the same GPUs make a four-stage pipeline.
    let plain = [
        Node::new("a").gpu("NVIDIA L40S", 48).gpu("NVIDIA L40S", 48).build(),
        Node::new("b").gpu("NVIDIA L40S", 48).gpu("NVIDIA L40S", 48).build(),
    ];
    let plan = run(&plain, &llama, &policy, &BTreeMap::new()).unwrap();
    assert_eq!(plan.stages().len(), 4);
    assert!(plan.stages().iter().all(|s| s.tp == 0));
}

#[test]
fn llama_3_70b_across_two_nodes_needs_allow_multi_node() {
    let llama = spec(LLAMA_70B);
    let nodes = [Node::new("w2").gpu("NVIDIA H100", 80).build(), Node::new("w1").gpu("NVIDIA H100", 80).build()];
    let u = unschedulable(run(&nodes, &llama, &binpack(), &BTreeMap::new()));
    assert!(u.fits_across_nodes);
    assert_eq!(
        u.to_string(),
        "needs 144.0 GiB; w1, w2: 1×80.0 GiB, 80.0 GiB free on the best GPU, needs 144.0 GiB \
         (fits across nodes; allow_multi_node is off)"
    );
    assert_eq!(u.reasons.iter().map(|r| r.node.as_str()).collect::<Vec<_>>(), ["w1", "w2"]);

    let policy = Policy { allow_multi_node: true, ..binpack() };
    let plan = run(&nodes, &llama, &policy, &BTreeMap::new()).unwrap();
    assert!(matches!(plan, Plan::MultiNode { .. }), "{plan:?}");
    assert_eq!(layout(&plan), vec![("w1", 0, 0..40), ("w2", 0, 40..80)]);
    assert!(plan.stages().iter().all(|s| s.bytes <= 80 * GIB && s.bytes > 70 * GIB));
}

#[test]
fn multi_node_keeps_each_nodes_stages_together() {
    let llama = spec(LLAMA_70B);
    // Largest first would be a:64, b:64, a:32 — a, b, a: two network hops. Grouped by node it
    // takes four GPUs instead, a's two and then b's two.
    let nodes = [
        Node::new("a").gpu("NVIDIA A100", 64).gpu("NVIDIA A100", 32).build(),
        Node::new("b").gpu("NVIDIA A100", 64).gpu("NVIDIA A100", 32).build(),
    ];
    let policy = Policy { allow_multi_node: true, ..binpack() };
    let plan = run(&nodes, &llama, &policy, &BTreeMap::new()).unwrap();
    let where_: Vec<(&str, u32)> = plan.stages().iter().map(|s| (s.node.as_str(), s.gpu)).collect();
    assert_eq!(where_, [("a", 0), ("a", 1), ("b", 0), ("b", 1)]);
    let layers: Vec<_> = plan.stages().iter().map(|s| s.layers.clone()).collect();
    assert_eq!(layers.first().unwrap().start, 0);
    assert_eq!(layers.last().unwrap().end, 80);
    assert!(layers.windows(2).all(|w| w[0].end == w[1].start && w[0].start < w[0].end), "{layers:?}");
    let mut nodes = nodes.to_vec();
    reserve(&mut nodes, &plan);
}

#[test]
fn split_on_one_node_binpack_takes_fewest_gpus_then_least_free_and_spread_most_free() {
    let llama = spec(LLAMA_70B);
    let nodes = [
        // 4×48 GiB holds it over four GPUs; the 2×80 GiB nodes over two.
        Node::new("a")
            .gpu("NVIDIA L40S", 48)
            .gpu("NVIDIA L40S", 48)
            .gpu("NVIDIA L40S", 48)
            .gpu("NVIDIA L40S", 48)
            .build(),
        Node::new("c").gpu("NVIDIA H100", 80).gpu("NVIDIA H100", 80).build(),
        Node::new("d").gpu("NVIDIA H100", 80).free_gib(77).gpu("NVIDIA H100", 80).free_gib(77).build(),
    ];
    let plan = run(&nodes, &llama, &binpack(), &BTreeMap::new()).unwrap();
    assert_eq!(layout(&plan), vec![("d", 0, 0..40), ("d", 1, 40..80)]);
    let plan = run(&nodes, &llama, &spread(), &BTreeMap::new()).unwrap();
    assert!(matches!(&plan, Plan::MultiGpu { node, .. } if node == "a"), "most free memory: {plan:?}");
    // With a replica already on a, spread moves to the next emptiest node.
    let replicas = BTreeMap::from([("a".to_string(), 1)]);
    let plan = run(&nodes, &llama, &spread(), &replicas).unwrap();
    assert_eq!(layout(&plan), vec![("c", 0, 0..40), ("c", 1, 40..80)]);
    // Only the 4×48 GiB node left: four stages, in layer order.
    let plan = run(&nodes[..1], &llama, &binpack(), &BTreeMap::new()).unwrap();
    assert_eq!(plan.stages().iter().map(|s| s.gpu).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert_eq!(plan.stages().last().unwrap().layers.end, 80);
}

#[test]
fn a_failed_split_on_a_node_is_in_its_reason() {
    let llama = spec(LLAMA_70B);
    let nodes = [Node::new("w1").gpu("NVIDIA H100", 80).gpu("NVIDIA H100", 80).free_gib(50).build()];
    let u = unschedulable(run(&nodes, &llama, &binpack(), &BTreeMap::new()));
    assert_eq!(
        u.to_string(),
        "needs 144.0 GiB; w1: 2×80.0 GiB, 80.0 GiB free on the best GPU, needs 144.0 GiB; 130.0 GiB free over 2 GPUs"
    );
}

#[test]
fn llama_3_8b_fits_one_24_gib_gpu() {
    let llama = spec(LLAMA_8B);
    let nodes = [Node::new("w1").gpu("NVIDIA A10G", 24).build()];
    let plan = run(&nodes, &llama, &binpack(), &BTreeMap::new()).unwrap();
    assert_eq!(layout(&plan), vec![("w1", 0, 0..32)]);
    assert_eq!(plan.total_bytes(), need(&llama, 5));
    assert_eq!(plan.total_bytes(), 18_961_292_421, "16.8 GiB estimated + 5%, rounded up");
}

#[test]
fn the_margin_makes_a_just_fitting_model_not_fit() {
    let llama = spec(LLAMA_8B);
    let exact = need(&llama, 0);
    let gpu = |free: u64| [Node::new("w1").gpu("NVIDIA A10G", 24).free_bytes(free).build()];
    let none = BTreeMap::new();
    assert_eq!(one_gpu(run_with_margin(&gpu(exact), &llama, &binpack(), &none, 0)).bytes, exact);
    let u = unschedulable(run_with_margin(&gpu(exact), &llama, &binpack(), &none, 5));
    assert_eq!(u.needs_bytes, need(&llama, 5));
    assert_eq!(one_gpu(run_with_margin(&gpu(need(&llama, 5)), &llama, &binpack(), &none, 5)).bytes, need(&llama, 5));
    unschedulable(run_with_margin(&gpu(need(&llama, 5) - 1), &llama, &binpack(), &none, 5));
}

#[test]
fn reserving_plan_after_plan_never_overcommits() {
    let models = [spec(LLAMA_70B), spec(LLAMA_8B), spec(LLAMA_3B), spec(SMOL_135M)];
    for strategy in [Strategy::Binpack, Strategy::Spread] {
        let policy = Policy { strategy, allow_multi_node: true, ..Policy::default() };
        let mut nodes = vec![
            Node::new("h").gpu("NVIDIA H100", 80).gpu("NVIDIA H100", 80).gpu("NVIDIA H100", 80).build(),
            Node::new("l").gpu("NVIDIA L40S", 48).gpu("NVIDIA L40S", 48).build(),
            Node::new("a").gpu("NVIDIA A10G", 24).build(),
            Node::new("t").gpu("NVIDIA T4", 16).gpu("NVIDIA T4", 16).build(),
        ];
        let mut replicas: Vec<BTreeMap<String, u32>> = vec![BTreeMap::new(); models.len()];
        let mut placed = vec![0u32; models.len()];
        let mut full = [false; 4];
        let mut turn = 0;
        let mut across_nodes = 0;
        while !full.iter().all(|&f| f) {
            let i = turn % models.len();
            turn += 1;
            if full[i] {
                continue;
            }
            match run(&nodes, &models[i], &policy, &replicas[i]) {
                Ok(plan) => {
                    let covered: u64 = plan.stages().iter().map(|s| s.layers.end - s.layers.start).sum();
                    assert_eq!(covered, models[i].weights.layout.layer_bytes.len() as u64);
                    reserve(&mut nodes, &plan);
                    across_nodes += u32::from(matches!(plan, Plan::MultiNode { .. }));
                    *replicas[i].entry(plan.stages()[0].node.clone()).or_insert(0) += 1;
                    placed[i] += 1;
                }
                Err(u) => {
                    // Nothing left fits, not even on the emptiest GPU.
                    let best = nodes.iter().flat_map(|n| &n.gpus).map(|g| g.free_bytes).max().unwrap();
                    assert!(best < u.needs_bytes, "{strategy:?}: {u}");
                    full[i] = true;
                }
            }
            assert!(turn < 10_000, "placement never ran out of room");
        }
        // 400 GiB in all: the 70B model (144 GiB) at most twice, and the small ones fill the
        // rest until each of the 8 GPUs has less left than the 135M model's 1.0 GiB.
        let free: u64 = nodes.iter().flat_map(|n| &n.gpus).map(|g| g.free_bytes).sum();
        assert!((1..=2).contains(&placed[0]), "{strategy:?}: {placed:?}");
        // The second 70B replica only fits over h's last GPU and l's two.
        assert!(across_nodes >= 1, "{strategy:?}");
        assert!(placed[1] >= 1 && placed[2] >= 1 && placed[3] >= 5, "{strategy:?}: {placed:?}");
        assert!(free < 8 * need(&models[3], 5), "{strategy:?}: {} left free", format_bytes(free));
    }
}

#[test]
fn strategy_parses_binpack_and_spread_only() {
    assert_eq!(Strategy::parse("binpack").unwrap(), Strategy::Binpack);
    assert_eq!(Strategy::parse(" Spread ").unwrap(), Strategy::Spread);
    let err = Strategy::parse("random").unwrap_err().to_string();
    assert_eq!(err, "placement strategy `random`: use binpack or spread");
    assert_eq!(Strategy::default(), Strategy::Binpack);
}

#[test]
fn plans_serialize_with_their_kind() {
    let stage = PlacedStage { node: "w1".into(), gpu: 0, layers: 0..32, bytes: 7, tp: 0, experts_on_host: 0 };
    let json = serde_json::to_value(Plan::OneGpu { stage }).unwrap();
    assert_eq!(json["kind"], "one_gpu");
    assert_eq!(json["stage"]["layers"]["end"], 32);
    let policy: Policy =
        serde_json::from_str(r#"{"strategy":"spread","node_selector":{},"gpu_name":"","allow_multi_node":false}"#)
            .unwrap();
    assert_eq!(policy.strategy, Strategy::Spread);
}

/// The sharding table: each model on each cluster, the stages the planner makes (node, GPU,
/// layers, reserved GiB) or the reason it cannot. Layers go in proportion to each GPU's room,
/// so uneven GPUs are filled unevenly, and binpack uses the fewest GPUs.
#[test]
fn the_sharding_table() {
    const MIXTRAL: &str = "mistralai/Mixtral-8x7B-Instruct-v0.1";
    let h100 = |n: &str, count: usize| (0..count).fold(Node::new(n), |node, _| node.gpu("NVIDIA H100", 80)).build();
    let l40 = |n: &str, count: usize| (0..count).fold(Node::new(n), |node, _| node.gpu("NVIDIA L40S", 48)).build();
    let multi = Policy { allow_multi_node: true, ..binpack() };
    type Row<'a> = (&'a str, &'a str, Vec<NodeView>, Policy, &'a str);
    let rows: Vec<Row> = vec![
        (
            "Llama-3-70B fp16, 1×80 GiB",
            LLAMA_70B,
            vec![h100("w1", 1)],
            binpack(),
            "unschedulable: needs 144.0 GiB; w1: 1×80.0 GiB, 80.0 GiB free on the best GPU, needs 144.0 GiB",
        ),
        ("Llama-3-70B fp16, 2×80 GiB", LLAMA_70B, vec![h100("w1", 2)], binpack(), "w1/0 0..40 72.3; w1/1 40..80 72.3"),
        (
            "Llama-3-70B fp16, 4×48 GiB",
            LLAMA_70B,
            vec![l40("w1", 4)],
            binpack(),
            "w1/0 0..20 37.5; w1/1 20..40 35.4; w1/2 40..60 35.4; w1/3 60..80 37.5",
        ),
        (
            "Llama-3-70B fp16, 2 nodes × 2×48 GiB, multi-node off",
            LLAMA_70B,
            vec![l40("w1", 2), l40("w2", 2)],
            binpack(),
            "unschedulable: needs 144.0 GiB; w1, w2: 2×48.0 GiB, 48.0 GiB free on the best GPU, needs 144.0 GiB; \
             96.0 GiB free over 2 GPUs (fits across nodes; allow_multi_node is off)",
        ),
        (
            "Llama-3-70B fp16, 2 nodes × 2×48 GiB",
            LLAMA_70B,
            vec![l40("w1", 2), l40("w2", 2)],
            multi.clone(),
            "w1/0 0..20 37.5; w1/1 20..40 35.4; w2/0 40..60 35.4; w2/1 60..80 37.5",
        ),
        (
            "Llama-3-8B fp16, 1×24 GiB",
            LLAMA_8B,
            vec![Node::new("w1").gpu("NVIDIA L4", 24).build()],
            binpack(),
            "w1/0 0..32 17.7",
        ),
        (
            "Llama-3-8B fp16, 16 + 8 GiB",
            LLAMA_8B,
            vec![Node::new("w1").gpu("NVIDIA A4000", 16).gpu("NVIDIA RTX 2080", 8).build()],
            binpack(),
            "w1/0 0..22 11.9; w1/1 22..32 6.3",
        ),
        (
            "Mixtral-8x7B fp16, 80 + 48 + 24 GiB",
            MIXTRAL,
            vec![Node::new("w1").gpu("NVIDIA H100", 80).gpu("NVIDIA L40S", 48).gpu("NVIDIA L4", 24).build()],
            binpack(),
            "w1/0 0..20 59.4; w1/1 20..32 36.0",
        ),
    ];
    let mut failures = Vec::new();
    for (name, model, nodes, policy, want) in rows {
        let spec = spec(model);
        let got = match run(&nodes, &spec, &policy, &BTreeMap::new()) {
            Ok(plan) => plan
                .stages()
                .iter()
                .map(|s| {
                    format!(
                        "{}/{} {}..{} {:.1}",
                        s.node,
                        s.gpu,
                        s.layers.start,
                        s.layers.end,
                        s.bytes as f64 / GIB as f64
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            Err(u) => format!("unschedulable: {u}"),
        };
        if got != want {
            failures.push(format!("{name}:\n  got  {got}\n  want {want}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
