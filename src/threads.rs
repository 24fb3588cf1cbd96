//! Threads that work beside the calls (a policy compile, the access log's
//! writer, the span exporter) run at a lower CPU priority than the ones
//! serving them.

/// Lowers the calling thread to niceness 10: against one busy serving
/// thread it gets about a tenth of a core when the cores are contended (CFS
/// weights 110 : 1024) and all it wants when they are not, and it does not
/// preempt a serving thread when it wakes. (At niceness 19 a 30 ms policy
/// compile took seconds while the test suite loaded both cores.) Failing to
/// lower it is logged, never fatal; `what` names the thread in that line.
pub fn lower_priority(what: &str) {
    use thread_priority::unix::{
        set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
        ThreadSchedulePolicy,
    };
    // The crate maps 0..=99 onto niceness 19..=-20 (rounding down): 22
    // is niceness 10 (the policy engine's unit test reads it back from /proc).
    let lower = thread_priority::ThreadPriorityValue::try_from(22u8)
        .map_err(|e| format!("{e:?}"))
        .and_then(|p| {
            set_thread_priority_and_policy(
                thread_native_id(),
                thread_priority::ThreadPriority::Crossplatform(p),
                ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other),
            )
            .map_err(|e| format!("{e:?}"))
        });
    if let Err(e) = lower {
        tracing::warn!(error = %e, "cannot lower the priority of the {what} thread");
    }
}
