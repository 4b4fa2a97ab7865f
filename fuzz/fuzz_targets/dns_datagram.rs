//! The DNS request path a UDP datagram takes (decode with hickory-proto, answer from the
//! catalog, encode within the client's size, the answer cache): any bytes get an answer
//! or none, never a panic, and an answer is never larger than a UDP datagram.
#![no_main]

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use switchyard_core::dns::{DnsConfig, DnsHandler, DnsSource, ServiceRecords, UdpCache};
use switchyard_core::model::{Instance, State};

/// `web` with two versions (one IPv6, one hostname) and `db`.
struct Fixed(BTreeMap<&'static str, Arc<ServiceRecords>>);

impl DnsSource for Fixed {
    fn service(&self, _namespace: &str, service: &str) -> Option<Arc<ServiceRecords>> {
        self.0.get(service).cloned()
    }
    fn revision(&self) -> u64 {
        7
    }
}

fn instance(service: &str, id: &str, address: &str, version: &str) -> Arc<Instance> {
    Arc::new(Instance {
        namespace: "default".into(),
        service: service.into(),
        id: id.into(),
        address: address.into(),
        port: 8080,
        version: version.into(),
        labels: Default::default(),
        weight: 100,
        zone: String::new(),
        state: State::Serving,
        mesh_port: 0,
    })
}

fn handler() -> &'static DnsHandler<Fixed> {
    static H: OnceLock<DnsHandler<Fixed>> = OnceLock::new();
    H.get_or_init(|| {
        let web = ServiceRecords::new(
            vec![
                instance("web", "w1", "10.0.0.1", "1.0.0"),
                instance("web", "w2", "fd00::2", "2.0.0"),
                instance("web", "w3", "web-3.example.com", "2.0.0"),
            ],
            None,
        );
        let db = ServiceRecords::new(vec![instance("db", "d1", "10.0.1.1", "5")], None);
        let source = Fixed(BTreeMap::from([
            ("web", Arc::new(web)),
            ("db", Arc::new(db)),
        ]));
        DnsHandler::new(source, &DnsConfig::default()).expect("handler")
    })
}

fuzz_target!(|data: &[u8]| {
    let h = handler();
    let mut cache = UdpCache::default();
    let mut rng = fastrand::Rng::with_seed(1);
    // Twice: the second may come from the cache, with this request's id.
    for _ in 0..2 {
        if let Some(answer) = cache.answer(h, data, &mut rng) {
            assert!(answer.len() <= 65_535);
        }
    }
});
