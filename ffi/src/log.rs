//! Logging: llama.cpp's log lines reach the host only through a callback it installs; by
//! default the library prints nothing and never touches the host's own logging (its
//! llama.cpp copy is private to libadaspec).

use std::ffi::{c_char, c_void};

use crate::status::boundary_value;

/// Receives one log line of the llama.cpp inside libadaspec: `level` is 1 (debug), 2 (info),
/// 3 (warning) or 4 (error); `text` is NUL-terminated, without the newline, valid only during
/// the call. Called on whichever thread logs; it must not call back into libadaspec.
pub type adaspec_log_callback = Option<unsafe extern "C" fn(level: i32, text: *const c_char, user_data: *mut c_void)>;

/// The host's callback and its `user_data`, moved to whichever thread logs.
struct HostSink {
    cb: unsafe extern "C" fn(i32, *const c_char, *mut c_void),
    user_data: *mut c_void,
}

// SAFETY: the host promises (header) that its callback may be called from any thread with
// this user_data.
unsafe impl Send for HostSink {}
// SAFETY: as above; the library only passes user_data back.
unsafe impl Sync for HostSink {}

impl HostSink {
    fn log(&self, level: i32, line: &str) {
        let mut text = Vec::with_capacity(line.len() + 1);
        text.extend(line.bytes().filter(|&b| b != 0));
        text.push(0);
        // SAFETY: the host's callback with a NUL-terminated string valid for the call.
        unsafe { (self.cb)(level, text.as_ptr() as *const c_char, self.user_data) }
    }
}

/// Installs `callback` (with `user_data`) for the library's log lines; NULL removes it (the
/// default: nothing is logged). Process-wide, for every model and session of this library.
#[no_mangle]
pub extern "C" fn adaspec_set_log_callback(callback: adaspec_log_callback, user_data: *mut c_void) {
    boundary_value("adaspec_set_log_callback", (), || {
        engine::backend::init();
        let sink = callback.map(|cb| HostSink { cb, user_data });
        engine::backend::set_log_sink(
            sink.map(|h| Box::new(move |level: i32, line: &str| h.log(level, line)) as engine::backend::LogSink),
        );
    })
}
