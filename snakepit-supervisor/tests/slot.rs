//! The slot state machine, driven in-process by `snakepit_testing::FakeWorker` on a paused
//! clock: no process, pipe or blocking thread; every wait is bounded (in virtual time).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use snakepit_core::{Adapter, Error, Launcher, Payload, Request, StartOptions, WorkerId};
use snakepit_supervisor::{
    Heartbeat, Member, RecycleReason, Slot, SlotConfig, SlotEvent, SlotManager, SlotState,
};
use snakepit_testing::{FakeControl, FakeWorker};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// What the slot reported, simplified, with the (virtual) time it happened.
#[derive(Debug, Clone, PartialEq)]
enum Ev {
    State(SlotState),
    Started { generation: u64, restart: bool },
    Exited { generation: u64 },
    StartFailed,
    Recycled { generation: u64, reason: RecycleReason },
    Missed(u32),
    Answered,
    Unresponsive,
}

/// A minimal pool: an idle list, and a log of what the slot did.
struct TestManager {
    launcher: Arc<dyn Launcher>,
    cfg: Arc<SlotConfig>,
    idle: Mutex<Vec<Arc<Member>>>,
    log: Mutex<Vec<(Instant, Ev)>>,
    changed: Notify,
}

impl TestManager {
    fn record(&self, ev: Ev) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push((Instant::now(), ev));
        self.changed.notify_waiters();
    }

    fn events(&self) -> Vec<Ev> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(_, e)| e.clone()).collect()
    }

    /// When `ev` was first recorded.
    fn when(&self, ev: &Ev) -> Option<Instant> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|(_, e)| e == ev).map(|(t, _)| *t)
    }

    fn count(&self, pred: impl Fn(&Ev) -> bool) -> usize {
        self.events().iter().filter(|e| pred(e)).count()
    }

    /// Waits (at most 10 virtual minutes) until the log satisfies `cond`.
    async fn until(&self, what: &str, cond: impl Fn(&[Ev]) -> bool) {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if cond(&self.events()) {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(600), wait).await.is_err() {
            panic!("timed out waiting for {what}; events: {:?}", self.events());
        }
    }

    fn idle_ids(&self) -> Vec<WorkerId> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|m| m.id()).collect()
    }
}

impl SlotManager for TestManager {
    async fn start(&self, id: WorkerId) -> Result<Arc<Member>, Error> {
        let handle = self.launcher.launch(StartOptions::new(id, "slot-test", 1 << 20)).await?;
        Ok(Arc::new(Member::new(handle, &self.cfg)))
    }

    fn admit(&self, member: &Arc<Member>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if !idle.iter().any(|m| Arc::ptr_eq(m, member)) {
            idle.push(member.clone());
        }
    }

    fn dismiss(&self, member: &Arc<Member>) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).retain(|m| !Arc::ptr_eq(m, member));
    }

    fn hold(&self, member: &Arc<Member>) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        match idle.iter().position(|m| Arc::ptr_eq(m, member) && m.leases() == 0) {
            Some(i) => {
                idle.remove(i);
                true
            }
            None => false,
        }
    }

    fn event(&self, _slot: usize, event: SlotEvent<'_>) {
        let ev = match event {
            SlotEvent::State(s) => Ev::State(s),
            SlotEvent::Started { worker, restart } => Ev::Started { generation: worker.generation, restart },
            SlotEvent::Exited { worker, .. } => Ev::Exited { generation: worker.generation },
            SlotEvent::StartFailed { .. } => Ev::StartFailed,
            SlotEvent::Recycled { worker, reason } => Ev::Recycled { generation: worker.generation, reason },
            SlotEvent::MissedHeartbeat { missed, .. } => Ev::Missed(missed),
            SlotEvent::HeartbeatAnswered { .. } => Ev::Answered,
            SlotEvent::Unresponsive { .. } => Ev::Unresponsive,
            other => panic!("unexpected event {other:?}"),
        };
        self.record(ev);
    }
}

/// Lets `d` of the paused clock pass (the runtime jumps straight to each timer): used to show
/// that something does *not* happen within a window, never to wait for an event.
async fn let_virtual_time_pass(d: Duration) {
    tokio::time::sleep(d).await;
}

struct Harness {
    mgr: Arc<TestManager>,
    slot: Arc<Slot>,
    control: FakeControl,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// A quiet slot config: no heartbeats, no jitter, fast restarts.
fn config() -> SlotConfig {
    let mut cfg = SlotConfig::default();
    cfg.heartbeat = None;
    cfg.recycle_jitter = 0.0;
    cfg.restart_min = Duration::from_millis(100);
    cfg.restart_max = Duration::from_secs(5);
    cfg
}

fn worker() -> FakeWorker {
    FakeWorker::new().tool("echo", |args| async move { Ok(args) }).crash_on("die")
}

async fn harness(worker: FakeWorker, cfg: SlotConfig) -> Harness {
    let control = worker.control();
    let launcher = worker.launcher().expect("a FakeWorker supplies its own launcher");
    let cfg = Arc::new(cfg);
    let mgr = Arc::new(TestManager {
        launcher,
        cfg: cfg.clone(),
        idle: Mutex::new(Vec::new()),
        log: Mutex::new(Vec::new()),
        changed: Notify::new(),
    });
    let slot = Arc::new(Slot::new(0));
    let first = mgr.start(WorkerId { slot: 0, generation: 0 }).await.expect("first start");
    slot.install(&*mgr, &first);
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(slot.clone().run(mgr.clone(), cfg, first, rx));
    Harness { mgr, slot, control, stop, task }
}

impl Harness {
    fn current(&self) -> Arc<Member> {
        self.slot.current().expect("the slot has a worker")
    }

    /// Crashes the current worker through its `die` tool; returns its generation.
    async fn crash(&self) -> u64 {
        let m = self.current();
        let r = m.connection().call(Request::new("die", Payload::null())).await;
        assert!(matches!(r, Err(Error::Disconnected { .. })), "{r:?}");
        m.id().generation
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("slot stops")
            .expect("no panic");
        assert_eq!(self.slot.state(), SlotState::Stopped);
    }
}

#[tokio::test(start_paused = true)]
async fn a_crashed_worker_is_restarted_after_a_growing_backoff() {
    let h = harness(worker(), config()).await;
    assert_eq!(h.mgr.events(), vec![Ev::State(SlotState::Ready)]);
    let t0 = Instant::now();
    h.crash().await;
    h.mgr.until("first restart", |e| e.contains(&Ev::Started { generation: 1, restart: true })).await;
    let first = h.mgr.when(&Ev::Started { generation: 1, restart: true }).expect("recorded") - t0;
    assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200), "{first:?}");
    assert_eq!(
        h.mgr.events()[1..],
        [
            Ev::Exited { generation: 0 },
            Ev::State(SlotState::Backoff),
            Ev::State(SlotState::Ready),
            Ev::Started { generation: 1, restart: true },
        ]
    );
    assert_eq!(h.mgr.idle_ids(), vec![WorkerId { slot: 0, generation: 1 }], "the replacement is offered");
    // The next crash waits longer (exponential: 200..400 ms).
    let t1 = Instant::now();
    h.crash().await;
    h.mgr.until("second restart", |e| e.contains(&Ev::Started { generation: 2, restart: true })).await;
    let second = h.mgr.when(&Ev::Started { generation: 2, restart: true }).expect("recorded") - t1;
    assert!(second >= Duration::from_millis(200) && second <= Duration::from_millis(400), "{second:?}");
    assert_eq!(h.control.starts(), 3);
    let r = h.current().connection().call(Request::new("echo", Payload::from(json!(7)))).await;
    assert_eq!(r.expect("the replacement serves").to_value().expect("json"), json!(7));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_intensity_limit_pauses_the_slot_for_a_window_then_recovers() {
    let mut cfg = config();
    cfg.max_restarts = 2;
    cfg.restart_window = Duration::from_secs(30);
    cfg.restart_max = Duration::from_millis(100);
    let h = harness(worker(), cfg).await;
    for generation in 0..3 {
        assert_eq!(h.crash().await, generation);
        let next = generation + 1;
        h.mgr
            .until("a restart or the pause", |e| {
                e.contains(&Ev::Started { generation: next, restart: true })
                    || e.contains(&Ev::State(SlotState::Failed))
            })
            .await;
    }
    // The third crash within the window trips the limit: paused for one window.
    let failed_at = h.mgr.when(&Ev::State(SlotState::Failed)).expect("tripped");
    assert_eq!(h.slot.state(), SlotState::Failed);
    assert!(h.mgr.idle_ids().is_empty(), "a failed slot offers no worker");
    h.mgr.until("recovery", |e| e.contains(&Ev::Started { generation: 3, restart: true })).await;
    let paused = h.mgr.when(&Ev::Started { generation: 3, restart: true }).expect("recorded") - failed_at;
    assert!(paused >= Duration::from_secs(30), "paused only {paused:?}");
    assert_eq!(h.slot.state(), SlotState::Ready);
    // After the pause, crashes restart normally again.
    for generation in 3..5 {
        assert_eq!(h.crash().await, generation);
        let next = generation + 1;
        h.mgr.until("restart", |e| e.contains(&Ev::Started { generation: next, restart: true })).await;
    }
    assert_eq!(h.mgr.count(|e| *e == Ev::State(SlotState::Failed)), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failing_starts_are_retried_with_backoff_until_one_succeeds() {
    let h = harness(worker(), config()).await;
    h.control.fail_starts(3);
    h.crash().await;
    h.mgr.until("a good start", |e| e.iter().any(|e| matches!(e, Ev::Started { restart: true, .. }))).await;
    assert_eq!(h.mgr.count(|e| *e == Ev::StartFailed), 3);
    assert_eq!(h.mgr.count(|e| *e == Ev::State(SlotState::Failing)), 3);
    // Each retry waits longer: 200..400 ms after the first failure, 400..800 ms after the second.
    let failures: Vec<Instant> = h
        .mgr
        .log
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(_, e)| *e == Ev::StartFailed)
        .map(|(t, _)| *t)
        .collect();
    let gaps: Vec<Duration> = failures.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[0] >= Duration::from_millis(200) && gaps[0] <= Duration::from_millis(400), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(400) && gaps[1] <= Duration::from_millis(800), "{gaps:?}");
    // Generations 1..=3 failed; 4 is the one that started.
    assert!(h.mgr.events().contains(&Ev::Started { generation: 4, restart: true }), "{:?}", h.mgr.events());
    assert_eq!(h.slot.state(), SlotState::Ready);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_misses_heartbeats_is_killed_and_replaced() {
    let mut cfg = config();
    cfg.heartbeat = Some(Heartbeat {
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        max_missed: 2,
    });
    let h = harness(worker(), cfg).await;
    // Answered pings change nothing.
    let_virtual_time_pass(Duration::from_secs(5)).await;
    assert_eq!(h.mgr.count(|e| matches!(e, Ev::Missed(_))), 0);
    assert!(h.mgr.count(|e| matches!(e, Ev::Answered)) > 0, "answered pings are reported");
    assert_eq!(h.mgr.idle_ids().len(), 1, "a pinged worker goes back to the idle list");
    h.control.hang_pings(true);
    let t0 = Instant::now();
    h.mgr.until("replacement", |e| e.contains(&Ev::Started { generation: 1, restart: true })).await;
    let e = h.mgr.events();
    let missed: Vec<_> = e.iter().filter(|e| matches!(e, Ev::Missed(_))).collect();
    assert_eq!(missed, [&Ev::Missed(1), &Ev::Missed(2)]);
    assert!(e.contains(&Ev::Unresponsive) && e.contains(&Ev::Exited { generation: 0 }), "{e:?}");
    // Bounded: interval x max_missed + timeout, plus the backoff.
    let took = h.mgr.when(&Ev::Unresponsive).expect("recorded") - t0;
    assert!(took <= Duration::from_millis(2 * 1000 + 500 + 1000), "{took:?}");
    h.control.hang_pings(false);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_busy_worker_is_not_pinged() {
    let mut cfg = config();
    cfg.heartbeat = Some(Heartbeat {
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        max_missed: 1,
    });
    let h = harness(worker(), cfg).await;
    let m = h.current();
    m.acquire(); // a call holds it
    h.control.hang_pings(true);
    let_virtual_time_pass(Duration::from_secs(10)).await;
    assert_eq!(h.mgr.count(|e| matches!(e, Ev::Missed(_))), 0, "{:?}", h.mgr.events());
    m.release();
    h.control.hang_pings(false);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn recycling_by_request_count_starts_the_replacement_first_and_drains_the_old_worker() {
    let mut cfg = config();
    cfg.max_requests = Some(3);
    cfg.drain_timeout = Duration::from_secs(60);
    let h = harness(worker(), cfg).await;
    let old = h.current();
    old.acquire(); // a call still runs on it
    for _ in 0..3 {
        old.count_request();
    }
    h.mgr.until("replacement", |e| e.contains(&Ev::Started { generation: 1, restart: false })).await;
    let e = h.mgr.events();
    let recycled =
        e.iter().position(|e| *e == Ev::Recycled { generation: 0, reason: RecycleReason::Requests });
    let started = e.iter().position(|e| *e == Ev::Started { generation: 1, restart: false });
    assert!(recycled.is_some() && recycled < started, "{e:?}");
    assert_eq!(
        h.mgr.idle_ids(),
        vec![WorkerId { slot: 0, generation: 1 }],
        "only the replacement is offered"
    );
    assert!(old.is_retiring());
    // Draining: the old worker lives until its call ends...
    let_virtual_time_pass(Duration::from_secs(10)).await;
    assert!(old.exit_info().is_none(), "stopped while a call held it");
    old.release();
    // ...then stops gracefully.
    let exit = tokio::time::timeout(Duration::from_secs(10), old.exited()).await.expect("old worker stops");
    assert_eq!(exit, snakepit_core::ExitInfo::Code(0));
    tokio::task::yield_now().await;
    assert!(h.slot.take_retiring().is_empty(), "a stopped worker is forgotten");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_retiring_worker_that_never_drains_is_stopped_at_the_drain_timeout() {
    let mut cfg = config();
    cfg.max_requests = Some(1);
    cfg.drain_timeout = Duration::from_secs(5);
    let h = harness(worker(), cfg).await;
    let old = h.current();
    old.acquire(); // never released
    old.count_request();
    h.mgr.until("replacement", |e| e.contains(&Ev::Started { generation: 1, restart: false })).await;
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), old.exited()).await.expect("stopped anyway");
    let took = Instant::now() - t0;
    assert!(took >= Duration::from_secs(4) && took <= Duration::from_secs(6), "{took:?}");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn recycling_by_age() {
    let mut cfg = config();
    cfg.max_age = Some(Duration::from_secs(30));
    let h = harness(worker(), cfg).await;
    let t0 = Instant::now();
    h.mgr
        .until("recycled by age", |e| e.contains(&Ev::Recycled { generation: 0, reason: RecycleReason::Age }))
        .await;
    let age = Instant::now() - t0;
    assert!(age >= Duration::from_secs(29) && age <= Duration::from_secs(31), "{age:?}");
    h.mgr.until("replacement", |e| e.contains(&Ev::Started { generation: 1, restart: false })).await;
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn recycling_by_memory() {
    let mut cfg = config();
    cfg.max_memory = Some(1000);
    cfg.memory_check = Duration::from_secs(1);
    let h = harness(worker(), cfg).await;
    h.control.set_memory(Some(500));
    let_virtual_time_pass(Duration::from_secs(5)).await;
    assert_eq!(h.mgr.count(|e| matches!(e, Ev::Recycled { .. })), 0, "under the limit");
    h.control.set_memory(Some(5000));
    h.mgr
        .until("recycled by memory", |e| {
            e.contains(&Ev::Recycled { generation: 0, reason: RecycleReason::Memory })
        })
        .await;
    h.control.set_memory(None);
    h.mgr.until("replacement", |e| e.contains(&Ev::Started { generation: 1, restart: false })).await;
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_during_backoff_stops_the_slot_without_a_start() {
    let mut cfg = config();
    cfg.restart_min = Duration::from_secs(10);
    cfg.restart_max = Duration::from_secs(10);
    let h = harness(worker(), cfg).await;
    h.crash().await;
    h.mgr.until("backoff", |e| e.contains(&Ev::State(SlotState::Backoff))).await;
    let starts = h.control.starts();
    h.stop.send_replace(true);
    tokio::time::timeout(Duration::from_secs(1), h.task).await.expect("stops at once").expect("no panic");
    assert_eq!(h.control.starts(), starts);
    assert_eq!(h.slot.state(), SlotState::Stopped, "every way out of the slot's task ends Stopped");
}

#[tokio::test(start_paused = true)]
async fn the_old_worker_keeps_serving_while_its_replacement_starts() {
    let mut cfg = config();
    cfg.max_requests = Some(1);
    let h = harness(worker().startup(Duration::from_secs(5)), cfg).await;
    let old = h.current();
    old.count_request();
    // Mid-way through the replacement's start-up, the old worker is still offered.
    let_virtual_time_pass(Duration::from_secs(2)).await;
    assert_eq!(h.mgr.idle_ids(), vec![WorkerId { slot: 0, generation: 0 }]);
    assert!(!old.is_retiring() && old.is_alive());
    assert_eq!(h.slot.state(), SlotState::Ready);
    h.mgr.until("replacement", |e| e.contains(&Ev::Started { generation: 1, restart: false })).await;
    assert!(old.is_retiring());
    assert_eq!(h.mgr.idle_ids(), vec![WorkerId { slot: 0, generation: 1 }]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_replacement_that_fails_to_start_leaves_the_slot_ready_with_the_old_worker() {
    let mut cfg = config();
    cfg.max_requests = Some(1);
    let h = harness(worker(), cfg).await;
    h.control.fail_starts(2);
    let old = h.current();
    old.count_request();
    h.mgr.until("replacement", |e| e.contains(&Ev::Started { generation: 3, restart: false })).await;
    assert_eq!(h.mgr.count(|e| *e == Ev::StartFailed), 2);
    assert_eq!(h.mgr.count(|e| *e == Ev::State(SlotState::Failing)), 0, "the circuit must not open");
    assert_eq!(h.slot.state(), SlotState::Ready);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_draining_worker_belongs_to_the_slot_until_it_stops() {
    let mut cfg = config();
    cfg.max_requests = Some(1);
    let h = harness(worker(), cfg).await;
    let old = h.current();
    old.acquire(); // never released: it drains until the pool takes it
    old.count_request();
    h.mgr.until("replacement", |e| e.contains(&Ev::Started { generation: 1, restart: false })).await;
    let retiring = h.slot.take_retiring();
    assert_eq!(retiring.len(), 1);
    assert!(Arc::ptr_eq(&retiring[0], &old), "the pool can stop it at shutdown");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_circuit_opens_while_every_slot_fails_to_start_and_closes_when_one_recovers() {
    // Two slots of one pool (one manager); the pool's circuit is "every slot is failing".
    let w = worker();
    let control = w.control();
    let cfg = Arc::new(config());
    let mgr = Arc::new(TestManager {
        launcher: w.launcher().expect("in-process launcher"),
        cfg: cfg.clone(),
        idle: Mutex::new(Vec::new()),
        log: Mutex::new(Vec::new()),
        changed: Notify::new(),
    });
    let (stop, rx) = watch::channel(false);
    let mut slots = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..2 {
        let slot = Arc::new(Slot::new(i));
        let first = mgr.start(WorkerId { slot: i, generation: 0 }).await.expect("first start");
        slot.install(&*mgr, &first);
        tasks.push(tokio::spawn(slot.clone().run(mgr.clone(), cfg.clone(), first, rx.clone())));
        slots.push(slot);
    }
    let circuit_open = |slots: &[Arc<Slot>]| slots.iter().all(|s| s.state().is_failing());
    control.fail_starts(u32::MAX);
    control.crash_all();
    mgr.until("both slots failing", |_| circuit_open(&slots)).await;
    assert!(circuit_open(&slots), "{:?}", slots.iter().map(|s| s.state()).collect::<Vec<_>>());
    assert!(mgr.idle_ids().is_empty());
    control.fail_starts(0);
    mgr.until("a recovery", |e| e.iter().any(|e| matches!(e, Ev::Started { restart: true, .. }))).await;
    assert!(!circuit_open(&slots), "one ready slot closes the circuit");
    mgr.until("both recover", |e| {
        e.iter().filter(|e| matches!(e, Ev::Started { restart: true, .. })).count() == 2
    })
    .await;
    stop.send_replace(true);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t).await.expect("slot stops").expect("no panic");
    }
}
