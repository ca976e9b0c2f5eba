//! Data parallel across GPUs over NCCL: one process per GPU (`kiln train --gpus N` starts
//! them), the gradient arena all-reduced in place as one flat bucket on the device, never
//! through the host.
//!
//! The processes meet through a file: rank 0 asks NCCL for the run's unique id and publishes
//! it (written whole, then renamed, so no reader sees half of it); the others wait for it, up
//! to the rank timeout. NCCL then connects them (`ncclCommInitRank`).

use std::path::Path;
use std::time::{Duration, Instant};

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use cudarc::driver::sys::CUdeviceptr;

use kiln_core::backend::{BackendError, Communicator, DType, HostReduce, View};

use crate::libs::{self, Lib};
use crate::CudaBackend;

/// The bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

/// NCCL's C API, the five functions kiln calls, bound by hand from `libnccl.so.2` (cudarc's
/// loader looks for NCCL under CUDA's version number, `libnccl.so.13`, which no NCCL is
/// called). Signatures as in nccl.h (NCCL 2.18 and later).
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; ID_BYTES],
}

type Comm = *mut c_void;
/// `ncclFloat32`, `ncclFloat64`.
const FLOAT32: c_int = 7;
const FLOAT64: c_int = 8;
/// `ncclSum`, `ncclMax`, `ncclMin`.
const SUM: c_int = 0;
const MAX: c_int = 2;
const MIN: c_int = 3;

struct Api {
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        *mut c_void,
    ) -> c_int,
    comm_destroy: unsafe extern "C" fn(Comm) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

/// NCCL's functions, loaded once, or why they cannot be.
fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let path = libs::require(Lib::Nccl)?;
        // SAFETY: NCCL's initialisers have no preconditions; the library stays loaded for the
        // process's life (leaked below), so the function pointers stay valid.
        unsafe {
            let lib =
                libloading::Library::new(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let lib: &'static libloading::Library = Box::leak(Box::new(lib));
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get($name)
                        .map_err(|e| format!("{}: {e}", String::from_utf8_lossy($name)))?
                };
            }
            Ok(Api {
                get_version: sym!(b"ncclGetVersion"),
                get_unique_id: sym!(b"ncclGetUniqueId"),
                comm_init_rank: sym!(b"ncclCommInitRank"),
                all_reduce: sym!(b"ncclAllReduce"),
                comm_destroy: sym!(b"ncclCommDestroy"),
                get_error_string: sym!(b"ncclGetErrorString"),
            })
        }
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// `Ok` for ncclSuccess, else NCCL's own words for the failure.
fn check(api: &Api, what: &str, code: c_int) -> Result<(), String> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: NCCL returns a static string for any code.
    let text = unsafe { std::ffi::CStr::from_ptr((api.get_error_string)(code)) };
    Err(format!(
        "{what}: {} (NCCL error {code})",
        text.to_string_lossy()
    ))
}

/// Writes `id` to `path` whole (a temporary file renamed over it).
pub fn publish_id(path: &Path, id: &[u8; ID_BYTES]) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, id)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot publish the NCCL id at {}: {e}", path.display()))
}

/// Waits for rank 0's id at `path`, up to `timeout`.
pub fn await_id(path: &Path, timeout: Duration) -> Result<[u8; ID_BYTES], String> {
    let started = Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(path) {
            return bytes.try_into().map_err(|b: Vec<u8>| {
                format!(
                    "{}: an NCCL id is {ID_BYTES} bytes, this file has {}",
                    path.display(),
                    b.len()
                )
            });
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "no NCCL id from rank 0 at {} after {:.0} s: rank 0 did not start or failed",
                path.display(),
                timeout.as_secs_f64()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// NCCL's version as `major.minor.patch`, or why NCCL cannot be used.
pub fn version() -> Result<String, String> {
    let api = api()?;
    let mut v = 0;
    // SAFETY: a plain out-parameter.
    check(api, "ncclGetVersion", unsafe { (api.get_version)(&mut v) })?;
    Ok(format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100))
}

/// This process's place in an NCCL communicator, with a few device values for the host
/// reductions.
pub struct Nccl {
    comm: Comm,
    api: &'static Api,
    rank: usize,
    size: usize,
    /// Room for [`HOST_VALUES`] f64s: the host reductions go through the device.
    host: CUdeviceptr,
    backend: CudaBackend,
}

/// The most values one [`Communicator::all_reduce_host`] call reduces.
const HOST_VALUES: usize = 64;

// SAFETY: the communicator is used by the one thread that trains (the trait takes `&self`
// from that thread only); NCCL communicators may move between threads.
unsafe impl Send for Nccl {}

impl Nccl {
    /// Joins the `size` processes of a run as `rank`, meeting at `id_file`.
    pub fn join(
        backend: &CudaBackend,
        rank: usize,
        size: usize,
        id_file: &Path,
        timeout: Duration,
    ) -> Result<Self, String> {
        let api = api()?;
        let id = if rank == 0 {
            let mut id = UniqueId {
                internal: [0; ID_BYTES],
            };
            // SAFETY: a plain out-parameter.
            check(api, "ncclGetUniqueId", unsafe {
                (api.get_unique_id)(&mut id)
            })?;
            publish_id(id_file, &id.internal.map(|c| c as u8))?;
            id
        } else {
            let bytes = await_id(id_file, timeout)?;
            UniqueId {
                internal: bytes.map(|b| b as c_char),
            }
        };
        backend.bind();
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` is an out-parameter; the id came from rank 0's ncclGetUniqueId.
        let code = unsafe { (api.comm_init_rank)(&mut comm, size as c_int, id, rank as c_int) };
        check(
            api,
            &format!("ncclCommInitRank (rank {rank} of {size})"),
            code,
        )?;
        // SAFETY: a plain allocation of HOST_VALUES f64s, freed in Drop.
        let host = unsafe { cudarc::driver::result::malloc_sync(HOST_VALUES * 8) }
            .map_err(|e| format!("NCCL scratch: {e:?}"))?;
        Ok(Nccl {
            comm,
            api,
            rank,
            size,
            host,
            backend: backend.clone(),
        })
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        self.backend.bind();
        // SAFETY: made in `join`, destroyed once.
        unsafe {
            let _ = (self.api.comm_destroy)(self.comm);
            let _ = cudarc::driver::result::free_sync(self.host);
        }
    }
}

fn nccl_err(message: String) -> BackendError {
    BackendError::Device {
        backend: "cuda".into(),
        message,
    }
}

impl Communicator<CudaBackend> for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(
        &self,
        backend: &CudaBackend,
        buffer: View<CudaBackend>,
    ) -> Result<(), BackendError> {
        assert_eq!(buffer.dtype(), DType::F32, "the gradient arena is f32");
        backend.bind();
        backend.written();
        let ptr = crate::addr(buffer) as *mut c_void;
        // SAFETY: in place over the view, on the legacy stream after the backward's kernels.
        let code = unsafe {
            (self.api.all_reduce)(
                ptr,
                ptr,
                buffer.len(),
                FLOAT32,
                SUM,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        check(self.api, "the gradients' all-reduce", code).map_err(nccl_err)
    }

    fn all_reduce_host(&self, values: &mut [f64], op: HostReduce) -> Result<(), BackendError> {
        assert!(
            values.len() <= HOST_VALUES,
            "{} host values to reduce",
            values.len()
        );
        if values.is_empty() {
            return Ok(());
        }
        self.backend.bind();
        let op = match op {
            HostReduce::Sum => SUM,
            HostReduce::Min => MIN,
            HostReduce::Max => MAX,
        };
        // SAFETY: the scratch holds HOST_VALUES f64s; the copies are synchronous and ordered
        // on the legacy stream around the all-reduce.
        unsafe {
            cudarc::driver::result::memcpy_htod_sync(self.host, values)
                .map_err(|e| nccl_err(format!("upload: {e:?}")))?;
            let p = self.host as *mut c_void;
            let code = (self.api.all_reduce)(
                p,
                p,
                values.len(),
                FLOAT64,
                op,
                self.comm,
                std::ptr::null_mut(),
            );
            check(self.api, "the step values' all-reduce", code).map_err(nccl_err)?;
            cudarc::driver::result::memcpy_dtoh_sync(values, self.host)
                .map_err(|e| nccl_err(format!("download: {e:?}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_travels_whole_through_its_file() {
        let dir = std::env::temp_dir().join(format!("kiln-nccl-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("id");
        let err = await_id(&path, Duration::from_millis(50)).unwrap_err();
        assert!(err.contains("rank 0 did not start"), "{err}");
        let id: [u8; ID_BYTES] = std::array::from_fn(|i| (i * 7) as u8);
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                publish_id(&path, &id).unwrap();
            })
        };
        assert_eq!(await_id(&path, Duration::from_secs(5)).unwrap(), id);
        writer.join().unwrap();
        std::fs::write(&path, [1u8; 5]).unwrap();
        let err = await_id(&path, Duration::from_secs(1)).unwrap_err();
        assert!(err.contains("128 bytes") && err.contains("has 5"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
