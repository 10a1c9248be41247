//! C ABI of the expert-parallel MoE layer (`include/moe_ep.h`): a thin, panic-safe layer over
//! `moe_operator::ep::session::Session`. Every call returns 0 on success or -1 with the reason in
//! `moe_ep_last_error()` (thread-local, valid until the thread's next call).

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use moe_operator::ep::session::Session;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn guard(f: impl FnOnce() -> Result<(), String>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            set_error(e);
            -1
        }
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            set_error(format!("internal error (panic): {what}"));
            -1
        }
    }
}

/// The reason of this thread's last failed call.
#[no_mangle]
pub extern "C" fn moe_ep_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Joins the group described by `config_json` (docs/data-plane.md); blocks until the whole
/// group has joined or the rendezvous times out. Returns NULL on failure.
///
/// # Safety
/// `config_json` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn moe_ep_create(config_json: *const c_char) -> *mut c_void {
    let mut out = std::ptr::null_mut();
    guard(|| {
        if config_json.is_null() {
            return Err("config_json is NULL".into());
        }
        // SAFETY: the caller passes a NUL-terminated string.
        let json = unsafe { CStr::from_ptr(config_json) }
            .to_str()
            .map_err(|_| "config_json is not UTF-8".to_string())?;
        let s = Session::from_json(json).map_err(|e| e.to_string())?;
        out = Box::into_raw(Box::new(s)).cast();
        Ok(())
    });
    out
}

unsafe fn session<'a>(h: *mut c_void) -> Result<&'a mut Session, String> {
    if h.is_null() {
        return Err("handle is NULL".into());
    }
    // SAFETY: a handle from moe_ep_create, not yet destroyed (the caller's contract).
    Ok(unsafe { &mut *h.cast::<Session>() })
}

/// # Safety
/// `h` is a live handle or NULL.
#[no_mangle]
pub unsafe extern "C" fn moe_ep_destroy(h: *mut c_void) {
    if !h.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: a handle from moe_ep_create, destroyed once.
            drop(unsafe { Box::from_raw(h.cast::<Session>()) })
        }));
    }
}

/// # Safety
/// `h` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn moe_ep_info(
    h: *mut c_void,
    rank: *mut u32,
    world: *mut u32,
    hidden: *mut u64,
) -> i32 {
    guard(|| {
        let s = unsafe { session(h) }?;
        // SAFETY: non-NULL out pointers are the caller's.
        unsafe {
            if !rank.is_null() {
                *rank = s.rank() as u32;
            }
            if !world.is_null() {
                *world = s.world() as u32;
            }
            if !hidden.is_null() {
                *hidden = s.hidden() as u64;
            }
        }
        Ok(())
    })
}

/// Starts a model step (a forward over all layers): plan switches happen only here.
///
/// # Safety
/// `h` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn moe_ep_begin_step(h: *mut c_void) -> i32 {
    guard(|| {
        unsafe { session(h) }?.begin_step();
        Ok(())
    })
}

/// Loads the plan at `plan_path` as `epoch` next to the active one; the group switches to it at
/// a step start once every rank has staged it.
///
/// # Safety
/// `h` is a live handle; `plan_path` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn moe_ep_stage_plan(
    h: *mut c_void,
    plan_path: *const c_char,
    epoch: u64,
) -> i32 {
    guard(|| {
        let s = unsafe { session(h) }?;
        if plan_path.is_null() {
            return Err("plan_path is NULL".into());
        }
        // SAFETY: NUL-terminated (the caller's contract).
        let p = unsafe { CStr::from_ptr(plan_path) }
            .to_str()
            .map_err(|_| "plan_path is not UTF-8".to_string())?;
        s.stage_plan(std::path::Path::new(p), epoch)
            .map_err(|e| e.to_string())
    })
}

/// One MoE layer: `x`, `out` are `tokens x hidden` bf16, `topk_ids` `tokens x top_k` int64,
/// `topk_weights` `tokens x top_k` float32, all device pointers on the session's device;
/// `stream` is the caller's CUstream (NULL: the legacy default stream). Returns with `out`
/// written.
///
/// # Safety
/// `h` is a live handle; the pointers address device buffers of those sizes.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn moe_ep_forward(
    h: *mut c_void,
    layer: u32,
    tokens: u64,
    top_k: u32,
    x: u64,
    topk_ids: u64,
    topk_weights: u64,
    out: u64,
    stream: *mut c_void,
) -> i32 {
    guard(|| {
        let s = unsafe { session(h) }?;
        // SAFETY: the caller's contract above.
        unsafe {
            s.forward_device(
                layer,
                tokens as usize,
                top_k as usize,
                x,
                topk_ids,
                topk_weights,
                out,
                stream.cast(),
            )
        }
        .map_err(|e| e.to_string())
    })
}
