//! The control mesh: one TCP connection between every two ranks, formed through a rendezvous at
//! rank 0, carrying each step's small messages (and, on the TCP transport, the rows too).
//!
//! Rendezvous: rank 0 listens at the rendezvous address; every other rank connects to it (retrying
//! until the deadline, since pods start in any order), says hello with its rank and the address it
//! listens at, and gets back everyone's addresses once the whole group has joined. Then rank j
//! connects to every rank 0 < i < j. Every read and write has a deadline: a rank that dies or
//! stalls ends the exchange with an error naming it, never a hang. After any error the mesh is
//! broken for good: a group with a missing rank cannot step, it restarts as a unit.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const HELLO_MAGIC: u32 = 0x4d6f_4548; // "MoEH"
const VERSION: u32 = 1;

#[derive(Clone, Debug)]
pub struct MeshConfig {
    pub rank: usize,
    pub world: usize,
    /// Where this rank listens (rank 0: the rendezvous address itself).
    pub listen: SocketAddr,
    /// Rank 0's rendezvous address.
    pub rendezvous: SocketAddr,
    /// How long the whole group may take to form.
    pub rendezvous_timeout: Duration,
    /// How long one exchange may wait for a peer.
    pub step_timeout: Duration,
    /// Largest message accepted from a peer.
    pub max_message_bytes: usize,
}

impl MeshConfig {
    pub fn new(rank: usize, world: usize, listen: SocketAddr, rendezvous: SocketAddr) -> Self {
        Self {
            rank,
            world,
            listen,
            rendezvous,
            rendezvous_timeout: Duration::from_secs(120),
            step_timeout: Duration::from_secs(120),
            max_message_bytes: 1 << 30,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("rank {rank} of a world of {world}: the rank must be below the world size")]
    Rank { rank: usize, world: usize },
    #[error("listening at {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("rendezvous: rank 0 at {addr} not reachable within {after:?}: {last}")]
    Unreachable {
        addr: SocketAddr,
        after: Duration,
        last: String,
    },
    #[error("rendezvous: ranks {missing:?} did not join within {after:?}")]
    Incomplete {
        missing: Vec<usize>,
        after: Duration,
    },
    #[error("rendezvous: {0}")]
    Protocol(String),
    #[error("rank {peer} went away: {source}")]
    PeerGone { peer: usize, source: std::io::Error },
    #[error("rank {peer} sent nothing for {after:?}")]
    Timeout { peer: usize, after: Duration },
    #[error("rank {peer} sent a {bytes}-byte message; the limit is {max}")]
    TooLarge { peer: usize, bytes: u64, max: usize },
    /// A peer ended its mesh because of another rank, and said which before it closed.
    #[error("{what} (reported by rank {via})")]
    Relayed {
        culprit: usize,
        via: usize,
        what: String,
    },
    #[error("the mesh is broken by an earlier error: {0}")]
    Broken(String),
}

impl MeshError {
    /// The rank this error is about, where it names one.
    pub fn culprit(&self) -> Option<usize> {
        match self {
            Self::PeerGone { peer, .. }
            | Self::Timeout { peer, .. }
            | Self::TooLarge { peer, .. } => Some(*peer),
            Self::Relayed { culprit, .. } => Some(*culprit),
            Self::Incomplete { missing, .. } => missing.first().copied(),
            _ => None,
        }
    }
}

/// Length marker of a poison frame: the sender's mesh broke because of the rank it names.
const POISON: u64 = u64::MAX;

fn poison_frame(culprit: usize, what: &str) -> Vec<u8> {
    let mut b = POISON.to_le_bytes().to_vec();
    let body_len = 4 + what.len();
    b.extend_from_slice(&(body_len as u64).to_le_bytes());
    b.extend_from_slice(&(culprit as u32).to_le_bytes());
    b.extend_from_slice(what.as_bytes());
    b
}

enum FrameError {
    Io(std::io::Error),
    TooLarge(u64),
    Poison { culprit: usize, what: String },
}

fn io_error(peer: usize, after: Duration, e: std::io::Error) -> MeshError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => MeshError::Timeout { peer, after },
        // read_exact's own words ("failed to fill whole buffer") say nothing to an operator.
        ErrorKind::UnexpectedEof => MeshError::PeerGone {
            peer,
            source: std::io::Error::new(ErrorKind::UnexpectedEof, "its connection closed"),
        },
        _ => MeshError::PeerGone { peer, source: e },
    }
}

fn hello(rank: usize, world: usize, addr: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&HELLO_MAGIC.to_le_bytes());
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(world as u32).to_le_bytes());
    b.extend_from_slice(&(rank as u32).to_le_bytes());
    b.extend_from_slice(addr.as_bytes());
    b
}

/// (rank, world, address) of a hello.
fn parse_hello(b: &[u8]) -> Result<(usize, usize, String), MeshError> {
    let field = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes(s.try_into().expect("4")))
    };
    let (Some(magic), Some(version), Some(world), Some(rank)) =
        (field(0), field(4), field(8), field(12))
    else {
        return Err(MeshError::Protocol(format!("a hello of {} bytes", b.len())));
    };
    if magic != HELLO_MAGIC {
        return Err(MeshError::Protocol(format!(
            "bad magic {magic:#x}: not a moe-operator rank"
        )));
    }
    if version != VERSION {
        return Err(MeshError::Protocol(format!(
            "peer speaks mesh version {version}, this rank {VERSION}: run one release in a group"
        )));
    }
    let addr = std::str::from_utf8(&b[16..])
        .map_err(|_| MeshError::Protocol("a hello's address is not UTF-8".into()))?;
    Ok((rank as usize, world as usize, addr.to_string()))
}

/// A step's socket, non-blocking after the rendezvous: reads and writes spin for a short while
/// before they sleep in `poll` (a rank's peers answer within microseconds when the group is in
/// step, and a sleeping thread takes tens of microseconds to wake), then give up after `timeout`.
struct Polled<'a> {
    s: &'a mut TcpStream,
    timeout: Duration,
}

/// How long a read or write spins before it sleeps in `poll`.
const SPIN: Duration = Duration::from_micros(500);

impl Polled<'_> {
    fn wait(&self, events: libc::c_short, started: Instant) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let spent = started.elapsed();
        if spent < SPIN {
            std::hint::spin_loop();
            return Ok(());
        }
        let left = self.timeout.saturating_sub(spent);
        if left.is_zero() {
            return Err(std::io::Error::new(
                ErrorKind::TimedOut,
                "no data within the timeout",
            ));
        }
        let mut fd = libc::pollfd {
            fd: self.s.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut fd, 1, ms) };
        match r {
            0 => Err(std::io::Error::new(
                ErrorKind::TimedOut,
                "no data within the timeout",
            )),
            r if r < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    Ok(())
                } else {
                    Err(e)
                }
            }
            _ => Ok(()),
        }
    }
}

impl Read for Polled<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let started = Instant::now();
        loop {
            match self.s.read(buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.wait(libc::POLLIN, started)?,
                other => return other,
            }
        }
    }
}

impl Write for Polled<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let started = Instant::now();
        loop {
            match self.s.write(buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.wait(libc::POLLOUT, started)?,
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

fn write_frame(s: &mut impl Write, b: &[u8]) -> std::io::Result<()> {
    if b.len() <= INLINE_MAX {
        // One segment for length and body: half the syscalls and packets of a step's messages.
        let mut f = Vec::with_capacity(8 + b.len());
        f.extend_from_slice(&(b.len() as u64).to_le_bytes());
        f.extend_from_slice(b);
        return s.write_all(&f);
    }
    s.write_all(&(b.len() as u64).to_le_bytes())?;
    s.write_all(b)
}

/// Messages up to this size are written by the exchanging thread itself, before it reads: they
/// fit in the kernel's socket buffers (a loopback or LAN receive buffer starts at 128 KiB), so the
/// write returns without the peer reading, and no thread hand-off is paid. Larger ones go through
/// the writer thread, which cannot deadlock on full buffers.
const INLINE_MAX: usize = 32 << 10;

fn read_frame(s: &mut impl Read, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len).map_err(FrameError::Io)?;
    let n = u64::from_le_bytes(len);
    if n == POISON {
        s.read_exact(&mut len).map_err(FrameError::Io)?;
        let n = u64::from_le_bytes(len).min(4096);
        let mut b = vec![0u8; n as usize];
        s.read_exact(&mut b).map_err(FrameError::Io)?;
        let culprit = b
            .get(..4)
            .map_or(u32::MAX, |c| u32::from_le_bytes(c.try_into().expect("4")));
        return Err(FrameError::Poison {
            culprit: culprit as usize,
            what: String::from_utf8_lossy(b.get(4..).unwrap_or_default()).into_owned(),
        });
    }
    if n > max as u64 {
        return Err(FrameError::TooLarge(n));
    }
    let mut b = vec![0u8; n as usize];
    s.read_exact(&mut b).map_err(FrameError::Io)?;
    Ok(b)
}

fn hello_error(e: FrameError) -> MeshError {
    match e {
        FrameError::Io(e) => MeshError::Protocol(format!("reading a hello: {e}")),
        FrameError::TooLarge(n) => MeshError::Protocol(format!("a hello of {n} bytes")),
        FrameError::Poison { what, .. } => MeshError::Protocol(what),
    }
}

/// Frames for the writer thread: (peer, bytes) in the order to write them.
type Job = Vec<(usize, Vec<u8>)>;

pub struct Mesh {
    rank: usize,
    world: usize,
    peers: Vec<Option<TcpStream>>,
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Result<(), MeshError>>,
    writer: Option<std::thread::JoinHandle<()>>,
    step_timeout: Duration,
    max: usize,
    broken: Option<String>,
}

fn accept_until(
    l: &TcpListener,
    deadline: Instant,
) -> std::io::Result<Option<(TcpStream, SocketAddr)>> {
    loop {
        match l.accept() {
            Ok((s, a)) => {
                s.set_nonblocking(false)?;
                return Ok(Some((s, a)));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The listening side of forming the group.
struct Accept<'a> {
    listener: &'a TcpListener,
    local: SocketAddr,
    deadline: Instant,
    /// The rendezvous timeout, for the error.
    after: Duration,
    /// How long one hello may take.
    handshake: Duration,
    world: usize,
}

impl Accept<'_> {
    /// Accepts connections until every rank of `want` has said hello, each once; with `addrs`,
    /// records the address each advertised (rank 0's table). A stray or broken connection does
    /// not stop the group forming: it is logged and dropped. `what` prefixes the logs.
    fn ranks(
        &self,
        want: std::ops::Range<usize>,
        peers: &mut [Option<TcpStream>],
        mut addrs: Option<&mut Vec<String>>,
        what: &str,
    ) -> Result<(), MeshError> {
        while peers[want.clone()].iter().any(Option::is_none) {
            let Some((mut s, from)) =
                accept_until(self.listener, self.deadline).map_err(|source| MeshError::Listen {
                    addr: self.local,
                    source,
                })?
            else {
                let missing = want.clone().filter(|&r| peers[r].is_none()).collect();
                return Err(MeshError::Incomplete {
                    missing,
                    after: self.after,
                });
            };
            let got = setup(&s, self.handshake)
                .map_err(|e| MeshError::Protocol(e.to_string()))
                .and_then(|_| read_frame(&mut s, 4096).map_err(hello_error))
                .and_then(|b| parse_hello(&b));
            match got {
                Ok((r, w, addr)) if w == self.world && want.contains(&r) && peers[r].is_none() => {
                    if let Some(a) = addrs.as_deref_mut() {
                        a[r] = addr;
                    }
                    peers[r] = Some(s);
                }
                Ok((r, w, _)) => {
                    tracing::warn!(%from, rank = r, world = w, "{what}: refused a hello (wrong world size, rank out of range, or a rank twice)")
                }
                Err(e) => tracing::warn!(%from, "{what}: {e}"),
            }
        }
        Ok(())
    }
}

fn setup(s: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))
}

impl Mesh {
    /// Binds this rank's listener (port 0 picks one) and forms the group.
    pub fn join(cfg: &MeshConfig) -> Result<Self, MeshError> {
        let listener = TcpListener::bind(cfg.listen).map_err(|source| MeshError::Listen {
            addr: cfg.listen,
            source,
        })?;
        Self::join_with(cfg, listener)
    }

    /// Forms the group on a listener already bound (tests bind port 0 first to learn rank 0's
    /// address).
    pub fn join_with(cfg: &MeshConfig, listener: TcpListener) -> Result<Self, MeshError> {
        let (rank, world) = (cfg.rank, cfg.world);
        if rank >= world || world == 0 {
            return Err(MeshError::Rank { rank, world });
        }
        let local = listener.local_addr().map_err(|source| MeshError::Listen {
            addr: cfg.listen,
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| MeshError::Listen {
                addr: local,
                source,
            })?;
        let deadline = Instant::now() + cfg.rendezvous_timeout;
        let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        let hs = Duration::from_secs(10).min(cfg.rendezvous_timeout);
        let table = if rank == 0 {
            let mut addrs = vec![String::new(); world];
            addrs[0] = local.to_string();
            let rendezvous = Accept {
                listener: &listener,
                local,
                deadline,
                after: cfg.rendezvous_timeout,
                handshake: hs,
                world,
            };
            rendezvous.ranks(1..world, &mut peers, Some(&mut addrs), "rendezvous")?;
            let table = addrs.join("\n").into_bytes();
            for (r, p) in peers.iter_mut().enumerate().skip(1) {
                let s = p.as_mut().expect("joined");
                write_frame(s, &table).map_err(|e| io_error(r, hs, e))?;
            }
            addrs
        } else {
            let mut s = connect_until(cfg.rendezvous, deadline, cfg.rendezvous_timeout)?;
            setup(&s, cfg.rendezvous_timeout).map_err(|e| io_error(0, hs, e))?;
            write_frame(&mut s, &hello(rank, world, &local.to_string()))
                .map_err(|e| io_error(0, hs, e))?;
            // Rank 0 answers once everyone joined: wait up to the whole rendezvous timeout.
            let t = read_frame(&mut s, 1 << 20).map_err(|e| match e {
                FrameError::Io(e)
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    MeshError::Incomplete {
                        missing: vec![],
                        after: cfg.rendezvous_timeout,
                    }
                }
                FrameError::Io(e) => MeshError::PeerGone { peer: 0, source: e },
                e => hello_error(e),
            })?;
            let addrs: Vec<String> = String::from_utf8_lossy(&t)
                .split('\n')
                .map(str::to_string)
                .collect();
            if addrs.len() != world {
                return Err(MeshError::Protocol(format!(
                    "rank 0 sent {} addresses for a world of {world}",
                    addrs.len()
                )));
            }
            peers[0] = Some(s);
            addrs
        };
        // Rank j connects to every 0 < i < j and accepts from every j < k.
        for (i, addr) in table.iter().enumerate().take(rank).skip(1) {
            let a: SocketAddr = addr
                .parse()
                .map_err(|_| MeshError::Protocol(format!("rank {i}'s address {addr:?}")))?;
            let mut s = connect_until(a, deadline, cfg.rendezvous_timeout)?;
            setup(&s, hs).map_err(|e| io_error(i, hs, e))?;
            write_frame(&mut s, &hello(rank, world, "")).map_err(|e| io_error(i, hs, e))?;
            peers[i] = Some(s);
        }
        if rank > 0 {
            let mesh = Accept {
                listener: &listener,
                local,
                deadline,
                after: cfg.rendezvous_timeout,
                handshake: hs,
                world,
            };
            mesh.ranks(rank + 1..world, &mut peers, None, "mesh")?;
        }
        for (r, p) in peers.iter().enumerate() {
            if let Some(s) = p {
                setup(s, cfg.step_timeout).map_err(|e| io_error(r, hs, e))?;
                // Steps read and write through `Polled` (spin, then poll with the deadline).
                s.set_nonblocking(true).map_err(|e| io_error(r, hs, e))?;
            }
        }
        let mut out = Self::start_writer(rank, world, peers, cfg)?;
        out.max = cfg.max_message_bytes;
        Ok(out)
    }

    fn start_writer(
        rank: usize,
        world: usize,
        peers: Vec<Option<TcpStream>>,
        cfg: &MeshConfig,
    ) -> Result<Self, MeshError> {
        let mut wpeers: Vec<Option<TcpStream>> = Vec::with_capacity(world);
        for (r, p) in peers.iter().enumerate() {
            wpeers.push(match p {
                Some(s) => Some(
                    s.try_clone()
                        .map_err(|e| io_error(r, cfg.step_timeout, e))?,
                ),
                None => None,
            });
        }
        let (jobs, rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        let after = cfg.step_timeout;
        let writer = std::thread::Builder::new()
            .name(format!("ep-mesh-writer-{rank}"))
            .spawn(move || {
                for job in rx {
                    let mut res = Ok(());
                    for (peer, b) in job {
                        let mut s = Polled {
                            s: wpeers[peer].as_mut().expect("a peer's stream"),
                            timeout: after,
                        };
                        let s = &mut s;
                        let raw = b.len() >= 8 && b[..8] == POISON.to_le_bytes();
                        let w = if raw {
                            s.write_all(&b)
                        } else {
                            write_frame(s, &b)
                        };
                        if let Err(e) = w {
                            res = Err(io_error(peer, after, e));
                            break;
                        }
                    }
                    if done_tx.send(res).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| MeshError::Protocol(format!("starting the mesh writer: {e}")))?;
        Ok(Self {
            rank,
            world,
            peers,
            jobs: Some(jobs),
            done,
            writer: Some(writer),
            step_timeout: cfg.step_timeout,
            max: cfg.max_message_bytes,
            broken: None,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Sends `out[p]` to every peer `p` and returns what each peer sent this rank (`out[rank]`
    /// comes back as `in[rank]`). Writes go out on the writer thread while this one reads, in a
    /// rotation (write to rank+s, read from rank-s) that cannot deadlock on full socket buffers.
    pub fn all_to_all(&mut self, mut out: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, MeshError> {
        if let Some(b) = &self.broken {
            return Err(MeshError::Broken(b.clone()));
        }
        assert_eq!(out.len(), self.world, "one message per rank");
        let res = self.exchange(&mut out);
        if let Err(e) = &res {
            self.broken = Some(e.to_string());
            // Tell the others which rank broke this one before it goes: otherwise a peer that
            // next finds this rank gone would blame it, not the rank that failed first.
            if let Some(c) = e.culprit() {
                let what = e.to_string();
                let job = (0..self.world)
                    .filter(|&p| p != self.rank && p != c)
                    .map(|p| (p, poison_frame(c, &what)))
                    .collect();
                if let Some(j) = &self.jobs {
                    let _ = j.send(job);
                }
            }
        }
        res
    }

    fn exchange(&mut self, out: &mut [Vec<u8>]) -> Result<Vec<Vec<u8>>, MeshError> {
        let (rank, world) = (self.rank, self.world);
        let mut got: Vec<Vec<u8>> = vec![Vec::new(); world];
        got[rank] = std::mem::take(&mut out[rank]);
        if world == 1 {
            return Ok(got);
        }
        let job: Job = (1..world)
            .map(|s| {
                let p = (rank + s) % world;
                (p, std::mem::take(&mut out[p]))
            })
            .collect();
        let inline = job.iter().all(|(_, b)| b.len() <= INLINE_MAX);
        if inline {
            for (p, b) in &job {
                let mut s = Polled {
                    s: self.peers[*p].as_mut().expect("a peer's stream"),
                    timeout: self.step_timeout,
                };
                write_frame(&mut s, b).map_err(|e| io_error(*p, self.step_timeout, e))?;
            }
        } else {
            self.jobs
                .as_ref()
                .expect("writer")
                .send(job)
                .map_err(|_| MeshError::Broken("the mesh writer stopped".into()))?;
        }
        for s in 1..world {
            let p = (rank + world - s) % world;
            let mut stream = Polled {
                s: self.peers[p].as_mut().expect("a peer's stream"),
                timeout: self.step_timeout,
            };
            got[p] = read_frame(&mut stream, self.max).map_err(|e| match e {
                FrameError::TooLarge(bytes) => MeshError::TooLarge {
                    peer: p,
                    bytes,
                    max: self.max,
                },
                FrameError::Io(e) => io_error(p, self.step_timeout, e),
                FrameError::Poison { culprit, what } => MeshError::Relayed {
                    culprit,
                    via: p,
                    what,
                },
            })?;
        }
        if !inline {
            match self
                .done
                .recv_timeout(self.step_timeout + Duration::from_secs(1))
            {
                Ok(r) => r?,
                Err(_) => return Err(MeshError::Broken("the mesh writer did not finish".into())),
            }
        }
        Ok(got)
    }
}

fn connect_until(
    addr: SocketAddr,
    deadline: Instant,
    after: Duration,
) -> Result<TcpStream, MeshError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(
            &addr,
            left.clamp(Duration::from_millis(1), Duration::from_secs(2)),
        ) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(MeshError::Unreachable {
                    addr,
                    after,
                    last: e.to_string(),
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Let queued poison frames go out (briefly) before the sockets close.
        if self.broken.is_some() {
            let deadline = Instant::now() + Duration::from_millis(300);
            while let Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) =
                self.done.recv_timeout(Duration::from_millis(20))
            {
                if Instant::now() >= deadline {
                    break;
                }
            }
        }
        for s in self.peers.iter().flatten() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.jobs = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Forms a group of `world` ranks on localhost, one thread each (tests and benchmarks).
pub fn local_group(world: usize, step_timeout: Duration) -> Result<Vec<Mesh>, MeshError> {
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|source| MeshError::Listen {
            addr: "127.0.0.1:0".parse().expect("addr"),
            source,
        })?;
    let rendezvous = listeners[0].local_addr().expect("bound");
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let mut cfg = MeshConfig::new(r, world, l.local_addr().expect("bound"), rendezvous);
            cfg.step_timeout = step_timeout;
            cfg.rendezvous_timeout = Duration::from_secs(20);
            std::thread::spawn(move || Mesh::join_with(&cfg, l))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect()
}

#[cfg(test)]
mod tests;
