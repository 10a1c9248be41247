use std::collections::HashMap;
use std::sync::mpsc;

use super::*;

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| m.get(k).cloned()
}

const POD: &[(&str, &str)] = &[
    (WORLD_SIZE_ENV, "6"),
    (RENDEZVOUS_ENV, "tiny-worker-0.tiny-workers.ml.svc:9403"),
    (LISTEN_ENV, "10.1.2.3:9403"),
    (TRANSPORT_ENV, "tcp"),
    (RENDEZVOUS_TIMEOUT_ENV, "20"),
];

#[test]
fn reads_the_operators_rank_environment() {
    assert_eq!(GroupEnv::from_env(env_of(&[])).unwrap(), None);
    let e = GroupEnv::from_env(env_of(POD)).unwrap().unwrap();
    assert_eq!(
        e,
        GroupEnv {
            world: 6,
            rendezvous: "tiny-worker-0.tiny-workers.ml.svc:9403".into(),
            rendezvous_port: 9403,
            listen: "10.1.2.3:9403".parse().unwrap(),
            transport: Transport::Tcp,
            rendezvous_timeout: Duration::from_secs(20),
            termination_log: DEFAULT_TERMINATION_LOG.into(),
        }
    );
    // Defaults: tcp, 120 s; the termination log from the kubelet emulation's variable.
    let mut pod: Vec<(&str, &str)> = POD[..3].to_vec();
    pod.push((TERMINATION_LOG_ENV, "/tmp/x/termination-log"));
    let e = GroupEnv::from_env(env_of(&pod)).unwrap().unwrap();
    assert_eq!(e.transport, Transport::Tcp);
    assert_eq!(e.rendezvous_timeout, DEFAULT_RENDEZVOUS_TIMEOUT);
    assert_eq!(e.termination_log, PathBuf::from("/tmp/x/termination-log"));
    // An IPv6 pod IP in `$(POD_IP):<port>` has no brackets.
    let mut pod = POD.to_vec();
    pod[2] = (LISTEN_ENV, "fd00::5:9403");
    pod[3] = (TRANSPORT_ENV, "nccl");
    let e = GroupEnv::from_env(env_of(&pod)).unwrap().unwrap();
    assert_eq!(e.listen, "[fd00::5]:9403".parse().unwrap());
    assert_eq!(e.transport, Transport::Nccl);
}

#[test]
fn refuses_a_broken_environment_naming_the_variable() {
    for (name, value, why) in [
        (WORLD_SIZE_ENV, "0", "positive"),
        (WORLD_SIZE_ENV, "three", "positive"),
        (RENDEZVOUS_ENV, "rank0-without-port", "host:port"),
        (LISTEN_ENV, "$(POD_IP):9403", "POD_IP"),
        (TRANSPORT_ENV, "rdma", "tcp, ipc or nccl"),
        (RENDEZVOUS_TIMEOUT_ENV, "20s", "seconds"),
    ] {
        let mut pod = POD.to_vec();
        pod.retain(|(k, _)| *k != name);
        pod.push((name, value));
        let e = GroupEnv::from_env(env_of(&pod)).unwrap_err().to_string();
        assert!(
            e.starts_with(name) && e.contains(why),
            "{name}={value}: {e}"
        );
    }
    let mut pod = POD.to_vec();
    pod.retain(|(k, _)| *k != RENDEZVOUS_ENV);
    let e = GroupEnv::from_env(env_of(&pod)).unwrap_err().to_string();
    assert!(e.contains(RENDEZVOUS_ENV) && e.contains("unset"), "{e}");
}

#[test]
fn local_ranks_listen_on_consecutive_ports_from_the_rendezvous_port() {
    let e = GroupEnv::from_env(env_of(POD)).unwrap().unwrap();
    let r = e.ranks(2..4).unwrap();
    assert_eq!(
        r,
        vec![
            RankSpec {
                rank: 2,
                local: 0,
                listen: "10.1.2.3:9403".parse().unwrap()
            },
            RankSpec {
                rank: 3,
                local: 1,
                listen: "10.1.2.3:9404".parse().unwrap()
            },
        ]
    );
    assert_eq!(e.ranks(0..3).unwrap()[0].listen.port(), 9403);
    assert_eq!(
        e.ranks(4..8),
        Err(GroupError::RanksOutsideWorld {
            ranks: 4..8,
            world: 6
        })
    );
    let mut other = e.clone();
    other.listen.set_port(9500);
    // Rank 0 must listen at the rendezvous port; other workers may listen anywhere.
    assert!(matches!(
        other.ranks(0..2),
        Err(GroupError::PortMismatch {
            listen: 9500,
            rendezvous: 9403
        })
    ));
    assert!(other.ranks(2..4).is_ok());
    other.listen.set_port(65535);
    assert!(matches!(
        other.ranks(2..4),
        Err(GroupError::PortRange { local: 1, .. })
    ));
}

#[test]
fn the_message_is_one_line_naming_the_rank() {
    let e = RankError::Mesh(MeshError::Relayed {
        culprit: 2,
        via: 0,
        what: "rank 2 went away: connection reset\nby peer".into(),
    });
    assert_eq!(
        failure_message(1, &e),
        "ep rank 1: rank 2 went away: connection reset by peer (reported by rank 0)"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("termination-log");
    std::fs::write(&path, "an older, longer message\n").unwrap();
    write_termination_message(&path, &failure_message(1, &e)).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with("ep rank 1: rank 2 went away"), "{text}");
}

/// A recorder of failures, and what the worker would exit with.
fn recorder() -> (OnFailure, mpsc::Receiver<(usize, String)>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let f: OnFailure = Arc::new(move |f: Failure| {
        let _ = tx.lock().unwrap().send((f.rank, f.message()));
    });
    (f, rx)
}

fn group_env(world: usize, listen: SocketAddr, rendezvous: SocketAddr, timeout: u64) -> GroupEnv {
    GroupEnv {
        world,
        rendezvous: rendezvous.to_string(),
        rendezvous_port: rendezvous.port(),
        listen,
        transport: Transport::Tcp,
        rendezvous_timeout: Duration::from_secs(timeout),
        termination_log: DEFAULT_TERMINATION_LOG.into(),
    }
}

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_workers_form_a_group_and_a_worker_gone_is_named() {
    // Worker A: rank 0 on 127.0.0.1; worker B: ranks 1 and 2 on 127.0.0.2 (two local ranks).
    let port = free_port("127.0.0.1");
    let rdv: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let b_listen: SocketAddr = format!("127.0.0.2:{}", free_port("127.0.0.2"))
        .parse()
        .unwrap();
    let (ma, mb) = (
        Arc::new(EpMetrics::default()),
        Arc::new(EpMetrics::default()),
    );
    let (fa, failures_a) = recorder();
    let (fb, failures_b) = recorder();
    // B first: its ranks wait for rank 0 to listen.
    let b = start(&group_env(3, b_listen, rdv, 20), 1..3, mb.clone(), fb)
        .unwrap()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(!mb.formed());
    let a = start(&group_env(3, rdv, rdv, 20), 0..1, ma.clone(), fa)
        .unwrap()
        .unwrap();
    wait_until("both workers formed", Duration::from_secs(10), || {
        ma.formed() && mb.formed()
    });
    // Heartbeats keep it formed.
    std::thread::sleep(HEARTBEAT * 2);
    assert!(ma.formed() && mb.formed());
    assert!(failures_a.try_recv().is_err() && failures_b.try_recv().is_err());

    // Worker B goes away (stopped: its ranks leave without reporting anything).
    b.stop();
    wait_until("worker B's ranks ended", Duration::from_secs(10), || {
        b.finished()
    });
    let (rank, msg) = failures_a
        .recv_timeout(Duration::from_secs(10))
        .expect("rank 0 reports the failure");
    assert_eq!(rank, 0);
    assert!(
        msg.starts_with("ep rank 0: rank 1 went away")
            || msg.starts_with("ep rank 0: rank 2 went away"),
        "{msg}"
    );
    assert!(!ma.formed());
    assert_eq!((ma.failures(), mb.failures()), (1, 0));
    assert!(
        failures_b.try_recv().is_err(),
        "a stopped worker reports nothing"
    );
    wait_until("worker A's rank ended", Duration::from_secs(5), || {
        a.finished()
    });
}

#[test]
fn a_rendezvous_that_does_not_complete_names_the_missing_rank() {
    let rdv: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let m = Arc::new(EpMetrics::default());
    let (f, failures) = recorder();
    let started = Instant::now();
    let _g = start(&group_env(2, rdv, rdv, 1), 0..1, m.clone(), f)
        .unwrap()
        .unwrap();
    let (rank, msg) = failures.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(rank, 0);
    assert!(
        msg.starts_with("ep rank 0: rendezvous: ranks [1] did not join within"),
        "{msg}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(m.failures(), 1);
}

#[test]
fn a_world_of_one_forms_at_once_and_other_transports_start_nothing() {
    let rdv: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let m = Arc::new(EpMetrics::default());
    let (f, failures) = recorder();
    let g = start(&group_env(1, rdv, rdv, 5), 0..1, m.clone(), f.clone())
        .unwrap()
        .unwrap();
    wait_until("a group of one formed", Duration::from_secs(5), || {
        m.formed()
    });
    std::thread::sleep(HEARTBEAT + HEARTBEAT / 2);
    assert!(failures.try_recv().is_err());
    g.stop();
    wait_until("the rank ended", Duration::from_secs(5), || g.finished());
    assert!(failures.try_recv().is_err(), "a stop is no failure");

    let mut env = group_env(2, rdv, rdv, 5);
    for t in [Transport::Ipc, Transport::Nccl] {
        env.transport = t;
        let m = Arc::new(EpMetrics::default());
        assert!(start(&env, 0..1, m.clone(), f.clone()).unwrap().is_none());
        assert!(!m.formed());
    }
}
