//! An executor must not park while one of its task queues is still runnable.
//!
//! glommio 0.9.0's scheduler read "preempted before the first task queue ran" as "nothing to
//! run" and parked: asleep in `io_uring_enter` with runnable tasks and nothing left to wake
//! it. A preemption is pending at that point whenever the preempt timer expires between being
//! armed and the scheduler's first check — which a short timer makes likely (the shard's
//! durability queue asks for 1 ms) and a thread kept off its core for as long as the timer
//! (a CFS quota, a busy host) makes possible with any timer. vendor/README.md describes the
//! patch; both tests hang without it.

use std::sync::mpsc;
use std::time::Duration;

use glommio::{Latency, LocalExecutor, LocalExecutorBuilder, Placement, Shares};

/// A hung executor never finishes; a working one takes milliseconds. Generous, so that a
/// slow machine is never mistaken for a hang.
const DEADLINE: Duration = Duration::from_secs(60);

/// How many times each test runs its executor: a pass that parks wrongly hangs for good.
const ROUNDS: usize = 200;

/// Runs `body` on an executor built by `builder`, on a thread of its own; fails unless it
/// returns within [`DEADLINE`].
fn finishes(builder: LocalExecutorBuilder, body: impl FnOnce(&LocalExecutor) + Send + 'static) {
    let (done, finished) = mpsc::channel();
    // Detached: a hung executor's thread cannot be joined, and the test must still report.
    std::thread::spawn(move || {
        body(&builder.make().expect("an executor"));
        let _ = done.send(());
    });
    finished
        .recv_timeout(DEADLINE)
        .expect("the executor parked with runnable tasks and never woke up");
}

/// A task's worth of trips through the scheduler.
async fn yield_a_few_times() {
    for _ in 0..4 {
        glommio::executor().yield_task_queue_now().await;
    }
}

#[test]
fn an_executor_whose_preempt_timer_expires_at_once_still_runs_its_tasks() {
    // 1 ns: expired by the scheduler's first check on almost every pass.
    let builder =
        LocalExecutorBuilder::new(Placement::Unbound).preempt_timer(Duration::from_nanos(1));
    finishes(builder, |executor| {
        for _ in 0..ROUNDS {
            let ran = executor.run(async {
                let tasks: Vec<_> = (0..8)
                    .map(|_| glommio::spawn_local(yield_a_few_times()))
                    .collect();
                let mut ran = 0;
                for task in tasks {
                    task.await;
                    ran += 1;
                }
                ran
            });
            assert_eq!(ran, 8);
        }
    });
}

#[test]
fn a_latency_sensitive_queue_that_shortens_the_timer_does_not_park_the_executor() {
    // The shard's shape: glommio's default timer, shortened whenever a `Latency::Matters`
    // queue (the durability queue) is woken by the reactor — here by a timer, in the shard by
    // a write or an fdatasync completing — with work in the default queue beside it.
    finishes(LocalExecutorBuilder::new(Placement::Unbound), |executor| {
        for _ in 0..ROUNDS {
            executor.run(async {
                let matters = glommio::executor().create_task_queue(
                    Shares::default(),
                    Latency::Matters(Duration::from_nanos(1)),
                    "matters",
                );
                let urgent = glommio::spawn_local_into(
                    async {
                        for _ in 0..4 {
                            glommio::timer::sleep(Duration::from_micros(10)).await;
                        }
                    },
                    matters,
                )
                .expect("the queue exists");
                let busy = glommio::spawn_local(yield_a_few_times());
                urgent.await;
                busy.await;
            });
        }
    });
}
