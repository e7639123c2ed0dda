//! Tensor parallelism: one model split across the devices of a node, every layer sliced.
//!
//! Which slice each rank holds is `gantry_core::tp`'s rule. Here: the [`Communicator`] seam the
//! ranks add their partial sums through (an in-process one that works for any device, here and
//! as the fallback; NCCL behind the `nccl` feature), and the slicing of loaded weights.
//!
//! Column-parallel matrices (query/key/value, gate/up, the output head) keep the rows of the
//! rank's heads or width; row-parallel ones (attention output, MLP down) keep the matching
//! columns, and their outputs are all-reduced before the bias is added once.

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Result, Tensor};

use crate::layers::Matrix;

/// How the ranks of a tensor-parallel group exchange activations. Every rank calls the same
/// collectives in the same order; each returns the same values on every rank.
pub trait Communicator: Send + Sync + std::fmt::Debug {
    /// This rank, `0..size`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// The element-wise sum of every rank's `t` (same shape on all), on `t`'s device. (The
    /// output head's vocabulary slices are gathered with it too: each rank's slice padded with
    /// zeros to the whole vocabulary, so the sum is exact.)
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Wakes every rank waiting in a collective with an error (a rank failed and will not come);
    /// the group refuses collectives until [`Communicator::reset`].
    fn abort(&self);
    /// Makes an aborted group usable again, once no rank is inside a collective.
    fn reset(&self);
}

/// The error a rank gets when another rank of its group failed mid-step.
pub const ABORTED: &str = "another rank of the tensor-parallel group failed";

/// Communicators for ranks on `devices` (rank `i` on device `i`): NCCL when every device is a
/// GPU and the build has the `nccl` feature, else an in-process [`HostGroup`].
pub fn communicators(devices: &[Device]) -> std::result::Result<Vec<Arc<dyn Communicator>>, crate::EngineError> {
    if devices.is_empty() {
        return Err(crate::EngineError::Config("tensor parallelism needs at least one device".into()));
    }
    #[cfg(feature = "nccl")]
    if devices.iter().all(Device::is_cuda) {
        return nccl::group(devices);
    }
    Ok(HostGroup::new(devices.len()).ranks())
}

/// One rank's place in a tensor-parallel group, as the loader and the layers see it.
#[derive(Debug, Clone)]
pub struct Shard {
    pub comm: Arc<dyn Communicator>,
}

impl Shard {
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// This rank's share of `total` rows.
    pub fn share(&self, total: usize) -> Range<usize> {
        gantry_core::tp::share(total, self.size(), self.rank())
    }
}

/// A group whose ranks are threads of this process: each collective meets at a barrier where
/// the last rank to arrive combines everyone's tensors on the CPU, in rank order (so every rank
/// gets the same bits, whatever order they arrive in).
#[derive(Debug)]
pub struct HostGroup {
    size: usize,
    state: Mutex<HostState>,
    arrived: Condvar,
}

#[derive(Debug)]
struct HostState {
    slots: Vec<Option<Tensor>>,
    waiting: usize,
    round: u64,
    result: Option<Tensor>,
    aborted: bool,
}

impl HostGroup {
    /// A group of `size` ranks; [`HostGroup::ranks`] hands out their communicators.
    pub fn new(size: usize) -> Arc<HostGroup> {
        Arc::new(HostGroup {
            size,
            state: Mutex::new(HostState {
                slots: vec![None; size],
                waiting: 0,
                round: 0,
                result: None,
                aborted: false,
            }),
            arrived: Condvar::new(),
        })
    }

    /// One communicator per rank.
    pub fn ranks(self: &Arc<HostGroup>) -> Vec<Arc<dyn Communicator>> {
        (0..self.size).map(|rank| Arc::new(HostRank { group: self.clone(), rank }) as Arc<dyn Communicator>).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HostState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn all_reduce_sum(&self, rank: usize, t: &Tensor) -> Result<Tensor> {
        let mine = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let mut s = self.lock();
        if s.aborted {
            return Err(candle_core::Error::Msg(ABORTED.into()));
        }
        s.slots[rank] = Some(mine);
        s.waiting += 1;
        let round = s.round;
        if s.waiting == self.size {
            let parts: Vec<Tensor> = s.slots.iter_mut().filter_map(Option::take).collect();
            let combined = parts.iter().skip(1).try_fold(parts[0].clone(), |acc, p| acc + p);
            s.waiting = 0;
            s.round += 1;
            match combined {
                Ok(c) => s.result = Some(c),
                Err(e) => {
                    s.aborted = true;
                    self.arrived.notify_all();
                    return Err(e);
                }
            }
            self.arrived.notify_all();
        } else {
            while s.round == round && !s.aborted {
                s = self.arrived.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if s.round == round {
                return Err(candle_core::Error::Msg(ABORTED.into()));
            }
        }
        let out = s.result.clone().ok_or_else(|| candle_core::Error::Msg("collective without a result".into()))?;
        drop(s);
        out.to_dtype(t.dtype())?.to_device(t.device())
    }
}

#[derive(Debug)]
struct HostRank {
    group: Arc<HostGroup>,
    rank: usize,
}

impl Communicator for HostRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.size
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.group.all_reduce_sum(self.rank, t)
    }

    fn abort(&self) {
        let mut s = self.group.lock();
        s.aborted = true;
        drop(s);
        self.group.arrived.notify_all();
    }

    fn reset(&self) {
        let mut s = self.group.lock();
        s.aborted = false;
        s.waiting = 0;
        s.slots.iter_mut().for_each(|x| *x = None);
        s.result = None;
    }
}

/// Rows `rows` (in order) of a tensor's first dimension: a bias, or a dense matrix `[out, in]`.
pub fn take_rows(t: &Tensor, rows: &[Range<usize>]) -> Result<Tensor> {
    let pieces: Vec<Tensor> = rows.iter().map(|r| t.narrow(0, r.start, r.len())).collect::<Result<_>>()?;
    Tensor::cat(&pieces, 0)?.contiguous()
}

/// Rows `rows` (in order) of a weight matrix `[out, in]`, quantized or dense.
pub fn matrix_rows(m: &Matrix, rows: &[Range<usize>]) -> Result<Matrix> {
    match m {
        QMatMul::Tensor(t) => Ok(QMatMul::Tensor(take_rows(t, rows)?)),
        QMatMul::TensorF16(t) => Ok(QMatMul::TensorF16(take_rows(t, rows)?)),
        QMatMul::QTensor(q) => QMatMul::from_qtensor(qtensor_rows(q, rows)?),
    }
}

/// Rows `rows` (in order) of a quantized matrix `[out, in]`, still quantized (rows are whole
/// blocks).
pub fn qtensor_rows(q: &QTensor, rows: &[Range<usize>]) -> Result<QTensor> {
    let (_, cols) = q.shape().dims2()?;
    let (bs, ts) = (q.dtype().block_size(), q.dtype().type_size());
    let row_bytes = cols / bs * ts;
    let data = q.data()?;
    let n: usize = rows.iter().map(|r| r.len()).sum();
    let mut out = Vec::with_capacity(n * row_bytes);
    for r in rows {
        out.extend_from_slice(&data[r.start * row_bytes..r.end * row_bytes]);
    }
    quantized(q, out, n, cols)
}

/// Columns `cols` of a weight matrix `[out, in]`; for a quantized one they must start and end
/// on the format's block boundaries.
pub fn matrix_cols(m: &Matrix, cols: Range<usize>) -> Result<Matrix> {
    match m {
        QMatMul::Tensor(t) => Ok(QMatMul::Tensor(t.narrow(1, cols.start, cols.len())?.contiguous()?)),
        QMatMul::TensorF16(t) => Ok(QMatMul::TensorF16(t.narrow(1, cols.start, cols.len())?.contiguous()?)),
        QMatMul::QTensor(q) => {
            let (rows, all) = q.shape().dims2()?;
            let (bs, ts) = (q.dtype().block_size(), q.dtype().type_size());
            if !cols.start.is_multiple_of(bs) || !cols.end.is_multiple_of(bs) {
                candle_core::bail!(
                    "columns {}..{} of a {:?} matrix do not fall on its {bs}-value blocks; this model cannot be split this many ways in this format",
                    cols.start,
                    cols.end,
                    q.dtype()
                );
            }
            let row_bytes = all / bs * ts;
            let (from, to) = (cols.start / bs * ts, cols.end / bs * ts);
            let data = q.data()?;
            let mut out = Vec::with_capacity(rows * (to - from));
            for r in 0..rows {
                out.extend_from_slice(&data[r * row_bytes + from..r * row_bytes + to]);
            }
            QMatMul::from_qtensor(quantized(q, out, rows, cols.len())?)
        }
    }
}

/// A quantized matrix of `like`'s type and device from raw blocks.
fn quantized(like: &QTensor, bytes: Vec<u8>, rows: usize, cols: usize) -> Result<QTensor> {
    let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &like.device(), like.dtype())?;
    QTensor::new(storage, (rows, cols))
}

/// NCCL between the GPUs of one process: one communicator per device from `ncclCommInitAll`,
/// each used only by its rank's thread.
#[cfg(feature = "nccl")]
mod nccl {
    #![allow(unsafe_code)] // NCCL's communicators, and device buffers NCCL fills: see SAFETY.

    use std::sync::{Arc, Mutex};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, ReduceOp};
    use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

    use super::Communicator;
    use crate::EngineError;

    /// A communicator behind a lock.
    struct Locked(Comm);

    // SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
    // concurrent; the mutex around it serializes them (and only its rank's thread calls it).
    unsafe impl Send for Locked {}

    struct NcclRank {
        comm: Mutex<Locked>,
        rank: usize,
        size: usize,
    }

    impl std::fmt::Debug for NcclRank {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "NcclRank({} of {})", self.rank, self.size)
        }
    }

    /// One NCCL communicator per CUDA device, in rank order.
    pub fn group(devices: &[Device]) -> std::result::Result<Vec<Arc<dyn Communicator>>, EngineError> {
        let streams = devices
            .iter()
            .map(|d| match d {
                Device::Cuda(c) => Ok(c.cuda_stream()),
                other => Err(EngineError::Config(format!("NCCL needs CUDA devices, not {other:?}"))),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let size = streams.len();
        let comms =
            Comm::from_devices(streams).map_err(|e| EngineError::Config(format!("NCCL set-up failed: {e:?}")))?;
        Ok(comms
            .into_iter()
            .enumerate()
            .map(|(rank, c)| Arc::new(NcclRank { comm: Mutex::new(Locked(c)), rank, size }) as Arc<dyn Communicator>)
            .collect())
    }

    struct AllReduce<'a>(&'a Comm);

    impl CustomOp1 for AllReduce<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("an NCCL all-reduce needs a CUDA tensor")
        }

        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let Some((start, end)) = l.contiguous_offsets() else {
                candle_core::bail!("an NCCL all-reduce needs a contiguous tensor")
            };
            if s.dtype() != DType::F32 {
                candle_core::bail!("an NCCL all-reduce of {:?} (the engine reduces f32)", s.dtype());
            }
            let dev = s.device().clone();
            let src = s.as_cuda_slice::<f32>()?.slice(start..end);
            // SAFETY: NCCL writes every element of `dst` before anything reads it (the reduce is
            // queued on the device's stream ahead of any later kernel).
            let mut dst = unsafe { dev.alloc::<f32>(end - start) }?;
            self.0
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce failed: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
        }
    }

    impl Communicator for NcclRank {
        fn rank(&self) -> usize {
            self.rank
        }

        fn size(&self) -> usize {
            self.size
        }

        fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
            let comm = self.comm.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            t.contiguous()?.apply_op1_no_bwd(&AllReduce(&comm.0))
        }

        /// NCCL cannot wake a peer blocked in a collective short of destroying the communicator
        /// (`ncclCommAbort`, which cudarc calls only on drop). Bad input is refused by every rank
        /// before its first collective, so it never strands a peer; a rank failing mid-step
        /// (a GPU out of memory) does, until the worker is restarted — a known gap.
        fn abort(&self) {}

        fn reset(&self) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ranks_all_get_the_same_sum() {
        let group = HostGroup::new(3);
        let comms = group.ranks();
        let out: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank() as f32;
                        let t = Tensor::new(&[r, 10.0 * r], &Device::Cpu).unwrap();
                        let sum = c.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap();
                        // A slice padded to the whole: the sum gathers the slices in order.
                        let part = Tensor::new(&[r + 1.0][..], &Device::Cpu).unwrap();
                        let padded = part.pad_with_zeros(0, c.rank(), 2 - c.rank()).unwrap();
                        let gathered = c.all_reduce_sum(&padded).unwrap().to_vec1::<f32>().unwrap();
                        (sum, gathered)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (sum, gathered) in out {
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(gathered, vec![1.0, 2.0, 3.0]);
        }
    }

    #[test]
    fn a_failed_rank_wakes_the_others_with_an_error_and_reset_recovers() {
        let group = HostGroup::new(2);
        let comms = group.ranks();
        let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        let waiter = {
            let (c, t) = (comms[0].clone(), t.clone());
            std::thread::spawn(move || c.all_reduce_sum(&t).map(|_| ()).unwrap_err().to_string())
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        comms[1].abort();
        assert_eq!(waiter.join().unwrap(), "another rank of the tensor-parallel group failed");
        comms[1].reset();
        let sums: Vec<f32> = std::thread::scope(|s| {
            let hs: Vec<_> = comms.iter().map(|c| s.spawn(|| c.all_reduce_sum(&t).unwrap())).collect();
            hs.into_iter().map(|h| h.join().unwrap().to_vec1::<f32>().unwrap()[0]).collect()
        });
        assert_eq!(sums, vec![2.0, 2.0]);
    }

    #[test]
    fn quantized_slices_keep_their_values() {
        let dev = Device::Cpu;
        let w = Tensor::arange(0f32, 64.0 * 128.0, &dev).unwrap().reshape((64, 128)).unwrap();
        let w = (w / 1000.0).unwrap();
        let q = QTensor::quantize(&w, candle_core::quantized::GgmlDType::Q8_0).unwrap();
        let full = q.dequantize(&dev).unwrap();
        let m = QMatMul::from_qtensor(q).unwrap();
        let rows = matrix_rows(&m, &[2..4, 10..11]).unwrap();
        let QMatMul::QTensor(rq) = &rows else { panic!("stays quantized") };
        let got = rq.dequantize(&dev).unwrap();
        let want = take_rows(&full, &[2..4, 10..11]).unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
        let cols = matrix_cols(&m, 32..96).unwrap();
        let QMatMul::QTensor(cq) = &cols else { panic!("stays quantized") };
        assert_eq!(
            cq.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap(),
            full.narrow(1, 32, 64).unwrap().to_vec2::<f32>().unwrap()
        );
        let err = matrix_cols(&m, 16..64).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("do not fall on its 32-value blocks"), "{err}");
    }
}
