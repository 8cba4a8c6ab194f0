//! Layer 2: a real guardd on a scratch socket and database, driven over gRPC and by guardctl.

use std::process::Command;

use harness::{artefact, grpc_message, h2_frame, is_deny, is_permit, Daemon, H2_PREFACE};
use proto::v1::{BeginRequest, ListRequest, LoginContext};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_code_permits_wrong_code_denies_and_a_code_is_accepted_once() {
    let d = Daemon::start();
    let secret = d.enroll_active("daemon").await;
    assert!(is_deny(&d.login("daemon", &secret.wrong_code()).await));
    let code = secret.code_at(0);
    assert!(is_permit(&d.login("daemon", &code).await), "{}", d.log());
    assert!(
        is_deny(&d.login("daemon", &code).await),
        "replayed code accepted"
    );
    // The next step's code is still good (within the ±1 step window).
    assert!(is_permit(&d.login("daemon", &secret.code_at(30)).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_and_users_without_a_token_are_denied_alike() {
    let d = Daemon::start();
    let unknown = d.login("no-such-user-soffid", "123456").await;
    let unenrolled = d.login("bin", "123456").await;
    assert!(is_deny(&unknown) && is_deny(&unenrolled));
    assert_eq!(
        unknown, unenrolled,
        "messages must not reveal whether a user exists"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_token_does_not_open_logins_and_confirm_needs_the_right_code() {
    let d = Daemon::start();
    let out = d.guardctl_output(None, &["enroll", "sys", "--label", "phone"], &[]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let uri = stdout
        .lines()
        .find(|l| l.starts_with("otpauth://totp/test:sys?secret="))
        .expect("URI on a line of its own");
    let secret = harness::Secret::from_uri(uri);
    assert!(is_deny(&d.login("sys", &secret.code_at(0)).await));
    let bad = d.guardctl_output(None, &["confirm", "sys", &secret.wrong_code()], &[]);
    assert_eq!(bad.status.code(), Some(1));
    let good = d.guardctl_output(None, &["confirm", "sys", &secret.code_at(0)], &[]);
    assert!(good.status.success(), "{good:?}");
    // The code that confirmed the token cannot log in, the next one can.
    assert!(is_deny(&d.login("sys", &secret.code_at(0)).await));
    assert!(is_permit(&d.login("sys", &secret.code_at(30)).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guardctl_lists_deletes_and_exits_with_the_documented_codes() {
    let d = Daemon::start();
    let _ = d.enroll_active("daemon").await;
    let list = d.guardctl_output(None, &["list"], &[]);
    assert!(list.status.success());
    let listing = String::from_utf8(list.stdout).unwrap();
    let row = listing.lines().find(|l| l.contains(" daemon ")).unwrap();
    assert!(row.contains("active"), "{listing}");
    let id = row.split_whitespace().next().unwrap();

    assert_eq!(
        d.guardctl_output(None, &["delete", "daemon", "ffffffffffff"], &[])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        d.guardctl_output(None, &["enroll", "no-such-user-soffid"], &[])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        d.guardctl_output(None, &["frobnicate"], &[]).status.code(),
        Some(2)
    );
    assert_eq!(
        d.guardctl_output(None, &["delete", "daemon"], &[])
            .status
            .code(),
        Some(2)
    );
    let deleted = d.guardctl_output(None, &["delete", "daemon", id], &[]);
    assert!(deleted.status.success(), "{deleted:?}");
    assert!(is_deny(&d.login("daemon", "123456").await));

    let down = Command::new(artefact("guardctl"))
        .args(["--socket", "/nonexistent/guardd.sock", "list"])
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(
        err.contains("cannot reach guardd") && err.lines().count() == 1,
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_input_is_refused_cleanly() {
    let d = Daemon::start();
    let secret = d.enroll_active("daemon").await;
    let mut client = d.client().await;
    // Larger than any real request (16 KiB): refused before it is read, not buffered.
    let huge = "x".repeat(100_000);
    let err = client
        .begin(BeginRequest {
            context: Some(LoginContext {
                user: huge.clone(),
                ..LoginContext::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    // Within the request size but not a valid field.
    let err = client
        .begin(BeginRequest {
            context: Some(LoginContext {
                user: "x".repeat(1000),
                ..LoginContext::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(is_deny(&d.login("daemon", &"9".repeat(10_000)).await));
    assert!(is_deny(&d.login("daemon", "12345\u{0}6").await));
    // The daemon is still fine afterwards.
    assert!(is_permit(&d.login("daemon", &secret.code_at(0)).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_used_steps_survive_a_restart_and_shutdown_removes_the_socket() {
    let mut d = Daemon::start();
    let secret = d.enroll_active("daemon").await;
    let code = secret.code_at(0);
    assert!(is_permit(&d.login("daemon", &code).await));
    d.restart();
    assert!(
        is_deny(&d.login("daemon", &code).await),
        "replay after restart"
    );
    assert!(is_permit(&d.login("daemon", &secret.code_at(30)).await));
    assert!(d.stop(), "SIGTERM must end guardd cleanly");
    assert!(!d.socket.exists(), "socket left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_socket_refuses_to_start() {
    let d = Daemon::start();
    let out = Command::new(artefact("guardd"))
        .arg("--socket")
        .arg(&d.socket)
        .arg("--database")
        .arg(d.dir.path().join("other.db"))
        .arg("--key-file")
        .arg(d.dir.path().join("other.key"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already listening"));
    // The first one still serves.
    assert!(d.client().await.list(ListRequest::default()).await.is_ok());
}

/// Callers are identified by SO_PEERCRED: another uid cannot begin a login for someone else,
/// nor administer tokens, but may begin its own. Needs root (a client under another uid).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn as_root_another_uid_cannot_act_for_someone_else() {
    let d = Daemon::start();
    let _ = d.enroll_active("daemon").await;
    // The checkout may sit under a private home: run copies from the daemon's 0755 scratch dir.
    let helper = d.world_executable_copy(&std::env::current_exe().unwrap());
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(helper)
        .args([
            "--exact",
            "helper_begin_as_caller",
            "--ignored",
            "--nocapture",
        ])
        .env("SOFFID_HELPER_SOCKET", &d.socket)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("helper: checked"),
        "helper did not run: {stdout}"
    );

    let as_nobody = d.guardctl_output(Some("nobody"), &["list", "daemon"], &[]);
    assert_eq!(as_nobody.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&as_nobody.stderr).contains("permission denied"));
    assert!(
        harness::audited(&d.log(), &[("outcome", "refused")]),
        "refusal not audited"
    );
}

/// Runs inside `as_root_another_uid_cannot_act_for_someone_else`, as nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper: run by as_root_another_uid_cannot_act_for_someone_else under setpriv"]
async fn helper_begin_as_caller() {
    let socket = std::env::var("SOFFID_HELPER_SOCKET").expect("run by the parent test");
    assert_ne!(nix::unistd::getuid().as_raw(), 0);
    let mut client = proto::v1::guard_client::GuardClient::new(
        proto::connect(socket, std::time::Duration::from_secs(5))
            .await
            .unwrap(),
    );
    let begin = |user: &str| BeginRequest {
        context: Some(LoginContext {
            user: user.into(),
            ..LoginContext::default()
        }),
    };
    let err = client.begin(begin("daemon")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = client.begin(begin("root")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    // Its own login is allowed (and denied for lack of a token, not for the caller).
    let own = client.begin(begin("nobody")).await.unwrap().into_inner();
    assert!(is_deny(&own));
    println!("helper: checked");
}

#[test]
fn a_client_that_waits_for_guardds_settings_gets_them() {
    // HTTP/2 lets a client wait for the server's SETTINGS before its first request; guardd holds
    // them back for the first answer only briefly.
    use std::io::{Read, Write};
    let d = Daemon::start();
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    s.write_all(&[H2_PREFACE, &h2_frame(0x4, 0, 0, &[])].concat())
        .unwrap();
    let mut header = [0u8; 9];
    s.read_exact(&mut header).expect("guardd's SETTINGS");
    assert_eq!((header[3], header[4] & 1), (0x4, 0), "{header:?}");
}

#[test]
fn the_first_answer_on_a_connection_arrives_in_one_piece_with_the_opening_frames() {
    // The PAM module waits to read as soon as it has sent its first call: guardd's SETTINGS, its
    // acknowledgement of the module's and the answer leave in one write, so the first read
    // returns all of them (a read returns at least what one write put in). Guardd holds its
    // opening frames back for 20 ms at most: three tries, for a debug build on a loaded machine.
    let d = Daemon::start();
    let tries: Vec<_> = (0..3).map(|_| first_read(&d.socket)).collect();
    assert!(
        tries
            .iter()
            .any(|(kinds, ended)| *ended && kinds[0] == (0x4, 0)),
        "no first read held guardd's SETTINGS and the whole answer: {tries:?}"
    );
}

/// The frames (type, stream) of the first read after sending a Begin on a new connection, and
/// whether they end stream 1.
fn first_read(socket: &std::path::Path) -> (Vec<(u8, u32)>, bool) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    // HPACK literals without indexing, as the module sends them.
    let mut headers = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/soffid.otp.v1.Guard/Begin"),
        (":authority", "guardd"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        headers.push(0);
        headers.push(name.len() as u8);
        headers.extend(name.as_bytes());
        headers.push(value.len() as u8);
        headers.extend(value.as_bytes());
    }
    let message = prost::Message::encode_to_vec(&BeginRequest {
        context: Some(LoginContext {
            user: "no-such-user-soffid".into(),
            service: "sshd".into(),
            ..LoginContext::default()
        }),
    });
    let mut body = vec![0];
    body.extend((message.len() as u32).to_be_bytes());
    body.extend(message);
    s.write_all(
        &[
            H2_PREFACE,
            &h2_frame(0x4, 0, 0, &[]),
            &h2_frame(0x1, 0x4, 1, &headers),
            &h2_frame(0x0, 0x1, 1, &body),
        ]
        .concat(),
    )
    .unwrap();
    let mut got = vec![0u8; 65536];
    let n = s.read(&mut got).unwrap();
    let (mut at, mut kinds, mut ended) = (0, Vec::new(), false);
    while at + 9 <= n {
        let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
        let stream = u32::from_be_bytes([got[at + 5], got[at + 6], got[at + 7], got[at + 8]]);
        kinds.push((got[at + 3], stream));
        ended |= stream == 1 && got[at + 4] & 1 != 0;
        at += 9 + len;
    }
    (kinds, ended)
}

/// A raw HTTP/2 connection to `d`, driven in the background.
async fn raw_connection(d: &Daemon) -> h2::client::SendRequest<bytes::Bytes> {
    let io = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
    let (send, connection) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(connection);
    send
}

/// One call by hand on a raw HTTP/2 connection: `chunks` as the request's DATA frames. Returns
/// the gRPC status (from the trailers, or from the headers of a trailers-only answer) and the
/// reply's bytes.
async fn raw_call(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    method: &str,
    path: &str,
    chunks: &[&[u8]],
) -> (String, Vec<u8>) {
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://guardd{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut stream) = send.send_request(request, chunks.is_empty()).unwrap();
    for (i, chunk) in chunks.iter().enumerate() {
        stream
            .send_data(bytes::Bytes::copy_from_slice(chunk), i + 1 == chunks.len())
            .unwrap();
    }
    let response = tokio::time::timeout(std::time::Duration::from_secs(5), response)
        .await
        .expect("no answer within 5 s")
        .unwrap();
    let status_of =
        |h: &http::HeaderMap| h.get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
    if let Some(status) = status_of(response.headers()) {
        return (status, Vec::new());
    }
    let mut body = response.into_body();
    let mut reply = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        reply.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    (status_of(&trailers).expect("grpc-status"), reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_calls_get_a_status_and_the_connection_serves_on() {
    use prost::Message;
    let d = Daemon::start();
    let mut send = raw_connection(&d).await;
    let begin = BeginRequest {
        context: Some(LoginContext {
            user: "daemon".into(),
            service: "sshd".into(),
            ..LoginContext::default()
        }),
    }
    .encode_to_vec();
    let framed = grpc_message(&begin);
    let path = "/soffid.otp.v1.Guard/Begin";
    // UNIMPLEMENTED (12): no such method, not a POST, a compressed message.
    let (status, _) = raw_call(&mut send, "POST", "/soffid.otp.v1.Guard/Nope", &[&framed]).await;
    assert_eq!(status, "12");
    let (status, _) = raw_call(&mut send, "GET", path, &[]).await;
    assert_eq!(status, "12");
    let mut compressed = framed.clone();
    compressed[0] = 1;
    let (status, _) = raw_call(&mut send, "POST", path, &[&compressed]).await;
    assert_eq!(status, "12");
    // INVALID_ARGUMENT (3): two messages in a unary call; a body that ends inside its message.
    let two = [framed.clone(), framed.clone()].concat();
    let (status, _) = raw_call(&mut send, "POST", path, &[&two]).await;
    assert_eq!(status, "3");
    let (status, _) = raw_call(&mut send, "POST", path, &[&framed[..framed.len() - 1]]).await;
    assert_eq!(status, "3");
    // OUT_OF_RANGE (11): a prefix that declares more than guardd reads, refused at the prefix.
    let (status, _) = raw_call(&mut send, "POST", path, &[&[0, 0, 16, 0, 0]]).await;
    assert_eq!(status, "11");
    // The same connection still serves: a call whose prefix and message come in pieces.
    let (status, reply) = raw_call(
        &mut send,
        "POST",
        path,
        &[&framed[..2], &framed[2..7], &framed[7..]],
    )
    .await;
    assert_eq!(status, "0", "{}", d.log());
    assert_eq!(reply[0], 0, "a reply is never compressed");
    let len = u32::from_be_bytes([reply[1], reply[2], reply[3], reply[4]]) as usize;
    assert_eq!(
        len,
        reply.len() - 5,
        "one message, its length in its prefix"
    );
    let step = proto::v1::Step::decode(&reply[5..]).unwrap();
    assert!(step.kind.is_some(), "{step:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_ends_at_its_clients_deadline_and_the_next_is_served() {
    let d = Daemon::start();
    let mut send = raw_connection(&d).await;
    // A request that never ends, sent with a 200 ms deadline (the PAM module sends its
    // `timeout=` so): guardd gives up when the client does, not after its own 15 s.
    let request = http::Request::builder()
        .method("POST")
        .uri("http://guardd/soffid.otp.v1.Guard/Status")
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "200m")
        .body(())
        .unwrap();
    let started = std::time::Instant::now();
    let (response, mut stream) = send.send_request(request, false).unwrap();
    stream
        .send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 10, 1]), false)
        .unwrap();
    let response = tokio::time::timeout(std::time::Duration::from_secs(5), response)
        .await
        .expect("no answer within 5 s")
        .unwrap();
    assert_eq!(response.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    // The connection serves the next call.
    let (status, _) = raw_call(
        &mut send,
        "POST",
        "/soffid.otp.v1.Guard/Status",
        &[&grpc_message(&[])],
    )
    .await;
    assert_eq!(status, "0", "{}", d.log());
}
