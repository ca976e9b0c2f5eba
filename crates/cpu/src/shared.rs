//! A raw pointer to a buffer that the thread pool's tasks write in disjoint parts: every
//! kernel that splits one output across tasks (GEMM tiles, attention heads, rows) shares it
//! this way. Each use says, at its `unsafe` block, why its tasks' parts do not overlap;
//! `ThreadPool::run` returns only after every task has finished, so no pointer outlives the
//! buffer's borrow.

pub(crate) struct SharedMut<T> {
    ptr: *mut T,
    len: usize,
}

impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedMut<T> {}

// SAFETY: see the module docs: tasks write disjoint elements, and the buffer outlives them.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub(crate) fn new(buffer: &mut [T]) -> Self {
        SharedMut {
            ptr: buffer.as_mut_ptr(),
            len: buffer.len(),
        }
    }

    /// A pointer without a length, for writers that check their own bounds (GEMM's C).
    pub(crate) fn from_raw(ptr: *mut T) -> Self {
        SharedMut {
            ptr,
            len: usize::MAX,
        }
    }

    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    pub(crate) fn get(self) -> *mut T {
        self.ptr
    }

    /// Elements `start..start + len`.
    ///
    /// # Safety
    /// No other task touches them while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice<'a>(self, start: usize, len: usize) -> &'a mut [T] {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "out of bounds"
        );
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }

    /// Writes element `i`.
    ///
    /// # Safety
    /// No other task writes element `i`.
    pub(crate) unsafe fn set(self, i: usize, value: T) {
        assert!(i < self.len, "out of bounds");
        *self.ptr.add(i) = value;
    }
}
