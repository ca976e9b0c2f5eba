//! Where the GPU's time goes, launch by launch (`KILN_CUDA_PROFILE=1`): a pair of CUDA events
//! around every kernel, product, zeroing and copy on the one stream, summed by name when asked
//! ([`kiln_core::backend::Backend::launch_times`]: `kiln bench train` prints the table after its
//! timed steps, `kiln train` writes it to the telemetry). Off, it costs one branch per
//! launch. The events time the stream between them, so each entry holds its launch's whole
//! time on the device, queueing gaps excluded.

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::driver::result::event;
use cudarc::driver::sys::{CUevent, CUevent_flags};
use kiln_core::backend::LaunchTime;

#[derive(Default)]
struct Marks {
    /// Events made and returned for reuse.
    free: Vec<CUevent>,
    /// (name, start, end) in launch order, not yet read.
    pending: Vec<(String, CUevent, CUevent)>,
}

pub(crate) struct Profiler {
    marks: Mutex<Marks>,
}

// SAFETY: CUevent handles are plain driver handles, used under the mutex, on the context the
// backend binds before every call.
unsafe impl Send for Profiler {}
unsafe impl Sync for Profiler {}

impl Profiler {
    /// A profiler when `KILN_CUDA_PROFILE` is set to anything but `0`.
    pub(crate) fn from_env() -> Option<Profiler> {
        match std::env::var("KILN_CUDA_PROFILE").as_deref() {
            Ok("0") | Err(_) => None,
            Ok(_) => Some(Profiler {
                marks: Mutex::new(Marks::default()),
            }),
        }
    }

    fn event(marks: &mut Marks) -> CUevent {
        marks.free.pop().unwrap_or_else(|| {
            event::create(CUevent_flags::CU_EVENT_DEFAULT)
                .unwrap_or_else(|e| panic!("cuda: profiling event: {e:?}"))
        })
    }

    /// Records the start of a launch on the legacy stream.
    pub(crate) fn start(&self) -> CUevent {
        let mut marks = self.marks.lock().unwrap();
        let e = Self::event(&mut marks);
        // SAFETY: a live event, recorded on the legacy default stream everything runs on.
        unsafe { event::record(e, std::ptr::null_mut()) }
            .unwrap_or_else(|err| panic!("cuda: recording an event: {err:?}"));
        e
    }

    /// Records the end of the launch begun at `start`, under `name`.
    pub(crate) fn end(&self, start: CUevent, name: String) {
        let mut marks = self.marks.lock().unwrap();
        let e = Self::event(&mut marks);
        // SAFETY: as in `start`.
        unsafe { event::record(e, std::ptr::null_mut()) }
            .unwrap_or_else(|err| panic!("cuda: recording an event: {err:?}"));
        marks.pending.push((name, start, e));
    }

    /// Waits for the stream, then sums the time of every launch since the last call by name,
    /// longest first, and starts afresh.
    pub(crate) fn take(&self) -> Vec<LaunchTime> {
        let mut marks = self.marks.lock().unwrap();
        let pending = std::mem::take(&mut marks.pending);
        let mut sums: HashMap<String, (f64, usize)> = HashMap::new();
        for (name, start, end) in pending {
            // SAFETY: both events were recorded on the one stream and are still live.
            let ms = unsafe {
                event::synchronize(end)
                    .and_then(|()| event::elapsed(start, end))
                    .unwrap_or_else(|e| panic!("cuda: reading an event: {e:?}"))
            };
            let entry = sums.entry(name).or_default();
            entry.0 += ms as f64;
            entry.1 += 1;
            marks.free.extend([start, end]);
        }
        let mut rows: Vec<LaunchTime> = sums
            .into_iter()
            .map(|(name, (ms, launches))| LaunchTime { name, ms, launches })
            .collect();
        rows.sort_by(|a, b| b.ms.total_cmp(&a.ms).then(a.name.cmp(&b.name)));
        rows
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        let marks = self.marks.get_mut().unwrap();
        for e in marks
            .free
            .drain(..)
            .chain(marks.pending.drain(..).flat_map(|(_, s, e)| [s, e]))
        {
            // SAFETY: made by `event::create`, destroyed once.
            unsafe {
                let _ = event::destroy(e);
            }
        }
    }
}
