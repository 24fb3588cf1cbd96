//! TLS both ways with certificates made at test time: mTLS to backends
//! (calls and health checks; a backend whose certificate does not verify
//! is never used), and client certificates on the listener, reloaded from
//! disk while a stream on an old connection goes on.

use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;
use weir::example::EchoBackend;
use weir::tls::{ClientAuth, ServerFiles, ServerTls};

use crate::support::eventually;
use crate::support::gateway::{admin_get, encode, frame, raw_call, req, Env};
use crate::support::pki::Pki;

const ROUTE: &str = "[[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\n";

/// A backend serving TLS with `cert`/`key` of `pki`, requiring client
/// certificates signed by `clients`.
async fn tls_backend(name: &str, pki: &Pki, clients: &Pki) -> EchoBackend {
    let (cert, key) = pki.issue(name, name);
    let tls = ServerTls::load(ServerFiles {
        cert,
        key,
        client_ca: Some(clients.ca()),
        client_auth: ClientAuth::Required,
    })
    .unwrap();
    EchoBackend::start_tls(name, Arc::new(tls)).await.unwrap()
}

fn upstream_tls(ca: &Pki, client: &Pki) -> String {
    let (cert, key) = client.issue("gateway", "gateway");
    format!(
        "[upstream.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        ca.ca().display().to_string(),
        cert.display().to_string(),
        key.display().to_string()
    )
}

async fn services(env: &Env) -> serde_json::Value {
    let (_, s) = admin_get(env.gateway().admin_addr, "/services").await;
    serde_json::from_str(&s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_health_checks_reach_backends_over_mtls() {
    let backends = Pki::new("backends CA");
    let gateways = Pki::new("gateways CA");
    let mut env = Env::start(0, &format!("{}{ROUTE}", upstream_tls(&backends, &gateways))).await;
    let echo = tls_backend("secure", &backends, &gateways).await;
    env.add_started("echo", echo, 100).await;
    env.wait_endpoints("echo", 1).await;
    let mut c = env.client().await;
    let reply = c.unary(req("over mtls")).await.expect("served over mTLS");
    assert_eq!(reply.into_inner().instance, "secure");
    // Health checks go over the same transport: the backend is SERVING.
    eventually(
        "a SERVING health check over TLS",
        Duration::from_secs(10),
        || async {
            let v = services(&env).await;
            let b = &v["echo"]["endpoints"][0]["backend"];
            b["health"] == "serving" && b["tls"] == true
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_whose_certificate_does_not_verify_is_never_used() {
    let backends = Pki::new("backends CA");
    let gateways = Pki::new("gateways CA");
    let impostors = Pki::new("impostors CA");
    let mut env = Env::start(0, &format!("{}{ROUTE}", upstream_tls(&backends, &gateways))).await;
    env.add_started(
        "echo",
        tls_backend("impostor", &impostors, &gateways).await,
        100,
    )
    .await;
    env.wait_endpoints("echo", 1).await;
    // Alone, it gets no call: UNAVAILABLE naming the service.
    let reply = raw_call(
        env.gateway().grpc_addr,
        "POST",
        "/weir.example.v1.Echo/Unary",
        &[("content-type", "application/grpc")],
        &[&encode(&req("x"))],
    )
    .await;
    assert_eq!(reply.grpc_status(), Some(14), "{reply:?}");
    assert!(
        reply.grpc_message().contains("echo"),
        "{}",
        reply.grpc_message()
    );
    let v = services(&env).await;
    let error = v["echo"]["endpoints"][0]["backend"]["last_connect_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("TLS"), "/services says why: {v}");
    let (_, m) = admin_get(env.gateway().admin_addr, "/metrics").await;
    assert!(m.contains("weir_upstream_tls_failures_total{"), "{m}");

    // Beside a trusted one, every call goes to the trusted one.
    env.add_started(
        "echo",
        tls_backend("trusted", &backends, &gateways).await,
        100,
    )
    .await;
    env.wait_endpoints("echo", 2).await;
    let mut c = env.client().await;
    for _ in 0..20 {
        let reply = c.unary(req("y")).await.expect("served by the trusted one");
        assert_eq!(reply.into_inner().instance, "trusted");
    }
}

/// A rustls client config trusting `ca`, presenting `identity` if any.
fn client_config(
    ca: &Pki,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca.ca()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

async fn connect_tls(
    addr: std::net::SocketAddr,
    config: &rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config.clone()))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
}

/// With `client_ca`, a client without a certificate is refused; one with
/// a certificate is served. The listener's certificate replaced on disk is
/// what a new connection sees within a second, while a server stream on a
/// connection made before keeps flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_and_the_listener_certificate_reloads() {
    let server = Pki::new("server CA");
    let clients = Pki::new("clients CA");
    let (cert, key) = server.issue("listener", "first");
    let (client_cert, client_key) = clients.issue("client", "a client");
    let env = Env::start(
        1,
        &format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n{ROUTE}",
            cert.display().to_string(),
            key.display().to_string(),
            clients.ca().display().to_string()
        ),
    )
    .await;
    let addr = env.gateway().grpc_addr;
    let with_cert = client_config(&server, Some((&client_cert, &client_key)));
    let without = client_config(&server, None);

    // No certificate: the handshake (or the first read after it) fails.
    let refused = match connect_tls(addr, &without).await {
        Err(_) => true,
        Ok(stream) => {
            let served =
                tokio::time::timeout(Duration::from_secs(5), raw_call_on_result(stream)).await;
            !matches!(served, Ok(true))
        }
    };
    assert!(refused, "a client without a certificate is not served");

    // A stream on a connection made before the certificate changes.
    let old = connect_tls(addr, &with_cert).await.expect("mTLS handshake");
    let first_der = old.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (mut sender, conn) = h2::client::handshake(old).await.unwrap();
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method("POST")
        .uri("http://localhost/weir.example.v1.Echo/ServerStream")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = sender.send_request(request, false).unwrap();
    let streamed = weir::example::pb::EchoRequest {
        repeat: 40,
        delay_ms: 50,
        ..req("long")
    };
    body.send_data(frame(&encode(&streamed)), true).unwrap();
    let mut replies = response.await.unwrap().into_body();
    let first = replies.data().await.expect("a first reply").unwrap();
    let _ = replies.flow_control().release_capacity(first.len());

    // Replace the certificate on disk (write beside, rename over).
    let (new_cert, new_key) = server.issue("next", "second");
    std::fs::rename(&new_key, &key).unwrap();
    std::fs::rename(&new_cert, &cert).unwrap();
    let began = std::time::Instant::now();
    let second_der = loop {
        let fresh = connect_tls(addr, &with_cert).await.expect("mTLS handshake");
        let der = fresh.get_ref().1.peer_certificates().unwrap()[0].clone();
        if der != first_der {
            break der;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "the new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("new certificate served after {:?}", began.elapsed());
    assert_ne!(second_der, first_der);
    // The old connection's stream goes on to its end.
    let mut bytes = first.len();
    while let Some(chunk) = replies.data().await {
        let chunk = chunk.expect("the old stream keeps flowing");
        bytes += chunk.len();
        let _ = replies.flow_control().release_capacity(chunk.len());
    }
    let trailers = replies.trailers().await.unwrap().unwrap();
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    assert!(bytes > 0);
    // And a new connection with the new certificate is served.
    let fresh = connect_tls(addr, &with_cert).await.unwrap();
    assert!(raw_call_on_result(fresh).await);
}

/// One unary call on `stream`: whether it succeeded (any failure, the
/// connection dropped included, is a no).
async fn raw_call_on_result(
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> bool {
    let Ok((mut sender, conn)) = h2::client::handshake(stream).await else {
        return false;
    };
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method("POST")
        .uri("http://localhost/weir.example.v1.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let Ok((response, mut body)) = sender.send_request(request, false) else {
        return false;
    };
    if body
        .send_data(frame(&encode(&req("over mtls"))), true)
        .is_err()
    {
        return false;
    }
    let Ok(response) = response.await else {
        return false;
    };
    let mut replies = response.into_body();
    while let Some(chunk) = replies.data().await {
        if chunk.is_err() {
            return false;
        }
    }
    matches!(replies.trailers().await, Ok(Some(t)) if t.get("grpc-status").is_some_and(|s| s == "0"))
}
