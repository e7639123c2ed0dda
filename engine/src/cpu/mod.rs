//! The CPU runtime: Gantry's own kernels, thread pool, paged KV cache and forward pass for
//! models on the CPU.

#[cfg(target_arch = "x86_64")]
mod attend512;
pub mod forward;
pub mod kernels;
pub mod kv;
pub mod model;
pub mod ops;
pub mod pool;
pub mod quant;
