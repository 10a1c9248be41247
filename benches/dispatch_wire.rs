//! The host TCP dispatch protocol's host path, compute left out: one request and its reply over a
//! real loopback socket, for a decode-sized and a prefill-sized batch (hidden 2048). The server
//! side does what the worker does around its experts (read the frame, decode the rows, write the
//! f32 outputs back); its "experts" only widen each bf16 value to f32, so that what is timed is
//! the protocol's copies, allocations and syscalls.
//!
//! - `copying`: the path as it was: a fresh frame per request and per reply, the reply built as
//!   one buffer, read into a fresh buffer and decoded into a `Vec<f32>`.
//! - `reusing`: the path as it is: the client encodes into and reads into buffers reused every
//!   layer and reads the outputs in place; the server writes the outputs' bytes as they are.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use moe_operator::worker::protocol::{
    decode_reply, decode_reply_ref, decode_request, encode_output, encode_request,
    encode_request_into, read_frame, read_frame_into, write_output, Reply, ReplyRef,
    DEFAULT_MAX_FRAME_BYTES,
};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const HIDDEN: usize = 2048;

/// The server: frames in, outputs out, until the client closes.
async fn serve(stream: TcpStream, reuse: bool) {
    stream.set_nodelay(true).unwrap();
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(16 << 10, rd);
    while let Some(body) = read_frame(&mut rd, DEFAULT_MAX_FRAME_BYTES).await.unwrap() {
        let req = decode_request(&body).unwrap();
        drop(body);
        let out: Vec<f32> = req.hidden.iter().map(|v| v.to_f32()).collect();
        let h = req.hidden_size;
        if reuse {
            write_output(&mut wr, req.request_id, req.rank, req.layer, h, &out)
                .await
                .unwrap();
        } else {
            let frame = encode_output(req.request_id, req.rank, req.layer, h, &out);
            wr.write_all(&frame).await.unwrap();
        }
    }
}

struct Client {
    stream: BufReader<TcpStream>,
    request: Vec<u8>,
    reply: Vec<u8>,
}

impl Client {
    /// One layer's request and reply; returns a checksum of the outputs.
    async fn call(&mut self, rows: &[(u32, f32, Vec<bf16>)], reuse: bool) -> f32 {
        let it = rows.iter().map(|(e, w, x)| (*e, *w, &x[..]));
        if reuse {
            encode_request_into(&mut self.request, 1, 0, 3, HIDDEN as u32, it);
            self.stream
                .get_mut()
                .write_all(&self.request)
                .await
                .unwrap();
            let read = read_frame_into(&mut self.stream, DEFAULT_MAX_FRAME_BYTES, &mut self.reply);
            assert!(read.await.unwrap());
            match decode_reply_ref(&self.reply).unwrap() {
                ReplyRef::Output(o) => o.values().filter(|v| v.is_finite()).sum(),
                ReplyRef::Error(e) => panic!("{}", e.message),
            }
        } else {
            let frame = encode_request(1, 0, 3, HIDDEN as u32, it);
            self.stream.get_mut().write_all(&frame).await.unwrap();
            let body = read_frame(&mut self.stream, DEFAULT_MAX_FRAME_BYTES)
                .await
                .unwrap()
                .unwrap();
            match decode_reply(&body).unwrap() {
                Reply::Output(o) => o.output.iter().filter(|v| v.is_finite()).sum(),
                Reply::Error(e) => panic!("{}", e.message),
            }
        }
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("dispatch_host_path_h2048");
    g.sample_size(20);
    for rows_n in [128usize, 2048] {
        let rows: Vec<(u32, f32, Vec<bf16>)> = (0..rows_n)
            .map(|r| {
                let x = (0..HIDDEN)
                    .map(|k| bf16::from_f32(((r * 31 + k * 7) % 97) as f32 / 97.0 - 0.5))
                    .collect();
                ((r % 8) as u32, 0.5, x)
            })
            .collect();
        g.throughput(Throughput::Bytes((rows_n * HIDDEN * 6) as u64));
        for (name, reuse) in [("copying", false), ("reusing", true)] {
            let mut client = rt.block_on(async {
                let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = l.local_addr().unwrap();
                tokio::spawn(async move {
                    let (s, _) = l.accept().await.unwrap();
                    serve(s, reuse).await;
                });
                let s = TcpStream::connect(addr).await.unwrap();
                s.set_nodelay(true).unwrap();
                Client {
                    stream: BufReader::with_capacity(256 << 10, s),
                    request: Vec::new(),
                    reply: Vec::new(),
                }
            });
            g.bench_with_input(BenchmarkId::new(name, rows_n), &rows_n, |b, _| {
                b.iter(|| black_box(rt.block_on(client.call(&rows, reuse))))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
