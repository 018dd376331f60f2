//! Any bytes, as a binary or a JSON document: decoding and peeking never
//! panic, agree with each other, and what decodes re-encodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use waybill::{Codec, Format};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let format = if selector & 1 == 0 { Format::Postcard } else { Format::Json };
    let codec = Codec::with_max_size(64 * 1024);
    let decoded = codec.decode(bytes, format);
    let peeked = codec.peek(bytes, format);
    if let Ok(doc) = decoded {
        let env = peeked.expect("a document that decodes must peek");
        assert_eq!((env.id, env.hop, env.status, env.attempt), (doc.id, doc.hop, doc.status, doc.attempt));
        assert_eq!(env.not_before, doc.not_before);
        let again = codec.encode(&doc, format).expect("a decoded document re-encodes");
        assert_eq!(codec.decode(&again, format).expect("and decodes again"), doc);
    }
});
