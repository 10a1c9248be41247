use std::time::{Duration, Instant};

use super::*;

#[test]
fn all_to_all_routes_every_message_even_past_socket_buffers() {
    let world = 4;
    let meshes = local_group(world, Duration::from_secs(10)).unwrap();
    let handles: Vec<_> = meshes
        .into_iter()
        .map(|mut m| {
            std::thread::spawn(move || {
                let r = m.rank();
                for round in 0..3u8 {
                    // 3 MiB to each peer: more than the kernel buffers, so writes block.
                    let out = (0..world)
                        .map(|p| {
                            vec![(r * 16 + p) as u8 ^ round; if round == 1 { 3 << 20 } else { 7 }]
                        })
                        .collect();
                    let got = m.all_to_all(out).unwrap();
                    for (p, b) in got.iter().enumerate() {
                        assert!(
                            b.iter().all(|&v| v == (p * 16 + r) as u8 ^ round),
                            "{r} from {p}"
                        );
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn a_rank_that_never_joins_is_named_by_rank_zero() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mut cfg = MeshConfig::new(0, 3, addr, addr);
    cfg.rendezvous_timeout = Duration::from_millis(600);
    let one = std::thread::spawn(move || {
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = MeshConfig::new(1, 3, l1.local_addr().unwrap(), addr);
        c.rendezvous_timeout = Duration::from_millis(600);
        Mesh::join_with(&c, l1).err().unwrap().to_string()
    });
    let started = Instant::now();
    let e = Mesh::join_with(&cfg, l).err().unwrap();
    assert!(
        matches!(&e, MeshError::Incomplete { missing, .. } if missing == &vec![2]),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let e1 = one.join().unwrap();
    assert!(
        e1.contains("rank 0 went away") || e1.contains("did not join"),
        "{e1}"
    );
}

#[test]
fn an_unreachable_rendezvous_is_an_error_after_the_timeout() {
    let gone = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = MeshConfig::new(1, 2, l.local_addr().unwrap(), gone);
    c.rendezvous_timeout = Duration::from_millis(300);
    let e = Mesh::join_with(&c, l).err().unwrap().to_string();
    assert!(
        e.starts_with(&format!("rendezvous: rank 0 at {gone} not reachable")),
        "{e}"
    );
}

#[test]
fn a_silent_peer_times_out_and_the_mesh_stays_broken() {
    let mut ms = local_group(3, Duration::from_millis(300)).unwrap();
    let _silent = ms.pop().unwrap();
    let mut m0 = ms.remove(0);
    let e = m0.all_to_all(vec![vec![1]; 3]).unwrap_err();
    assert!(matches!(e, MeshError::Timeout { peer: 2, .. }), "{e}");
    let e = m0.all_to_all(vec![vec![1]; 3]).unwrap_err();
    assert!(matches!(e, MeshError::Broken(_)), "{e}");
}

#[test]
fn an_oversized_message_is_refused() {
    let mut ms = local_group(2, Duration::from_secs(5)).unwrap();
    let mut m1 = ms.pop().unwrap();
    let mut m0 = ms.pop().unwrap();
    m0.max = 16;
    let t = std::thread::spawn(move || {
        let _ = m1.all_to_all(vec![vec![0; 64], vec![]]);
    });
    let e = m0.all_to_all(vec![vec![], vec![0; 4]]).unwrap_err();
    assert!(
        matches!(
            e,
            MeshError::TooLarge {
                peer: 1,
                bytes: 64,
                max: 16
            }
        ),
        "{e}"
    );
    drop(m0);
    t.join().unwrap();
}
