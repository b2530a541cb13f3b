//! The gRPC worker rejects calls without its token. Drives a real bridge by hand: the hello on
//! its stdio pipe, then raw tonic calls on its socket.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use snakepit::grpc::proto::{worker_client::WorkerClient, CallRequest};
use snakepit_tests::{venv_python, Reaper};

#[tokio::test]
#[allow(clippy::disallowed_methods)] // runs the bridge by hand, as an intruder would
async fn a_call_without_the_token_is_rejected() {
    let r = Reaper::new();
    let venv = venv_python();
    let sock = r.dir().join("w.sock");
    let mut child = Command::new(&venv)
        .args(["-m", "snakepit_bridge", "--module", "snakepit_bridge.showcase"])
        .env("PYTHONPATH", snakepit::adapters::bridge_dir().expect("bridge"))
        .env(snakepit_tests::procs::MARKER_VAR, &r.marker)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let hello = serde_json::json!({
        "t": "hello", "versions": [1], "max_frame": 1 << 20, "config": null,
        "transport": {"kind": "grpc", "socket": sock.to_string_lossy(), "token": "s3cret"}
    })
    .to_string();
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(&(hello.len() as u32).to_be_bytes()).expect("write");
    stdin.write_all(hello.as_bytes()).expect("write");
    stdin.flush().expect("flush");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut h = [0u8; 4];
    stdout.read_exact(&mut h).expect("ready header");
    let mut body = vec![0; u32::from_be_bytes(h) as usize];
    stdout.read_exact(&mut body).expect("ready");
    let ready: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(ready["address"], format!("unix:{}", sock.display()));
    let channel = snakepit::grpc::unix_channel(&sock, Duration::from_secs(10)).await.expect("connect");
    let mut client = WorkerClient::new(channel);
    let call = || CallRequest {
        id: 1,
        command: "add".into(),
        args: br#"{"a":1,"b":2}"#.to_vec(),
        ..Default::default()
    };
    let denied = client.execute(tonic::Request::new(call())).await.expect_err("no token");
    assert_eq!(denied.code(), tonic::Code::Unauthenticated);
    let mut wrong = tonic::Request::new(call());
    wrong.metadata_mut().insert("x-snakepit-token", "guess".parse().expect("ascii"));
    assert_eq!(client.execute(wrong).await.expect_err("wrong token").code(), tonic::Code::Unauthenticated);
    let mut right = tonic::Request::new(call());
    right.metadata_mut().insert("x-snakepit-token", "s3cret".parse().expect("ascii"));
    let reply = client.execute(right).await.expect("with the token").into_inner();
    assert!(
        matches!(reply.outcome, Some(snakepit::grpc::proto::call_reply::Outcome::Ok(ref b)) if b == b"3")
    );
    drop(stdin);
    let pid = child.id() as i32;
    assert!(
        snakepit_tests::procs::wait_exit(pid, Instant::now() + Duration::from_secs(10)),
        "the bridge exits on EOF"
    );
    let _ = child.wait();
}
