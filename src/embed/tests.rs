use super::*;

fn settings(max_inputs: usize, max_tokens: u64) -> Settings {
    Settings { max_inputs, max_tokens, ..Settings::default() }
}

fn scan(body: &str) -> RequestFields {
    json::scan_request(body.as_bytes()).unwrap()
}

fn items(body: &str) -> Vec<String> {
    let f = scan(body);
    let i = inputs(body.as_bytes(), f.input.as_ref().unwrap()).unwrap();
    i.items.iter().map(|r| body[r.clone()].to_owned()).collect()
}

#[test]
fn every_openai_input_form_is_read() {
    assert_eq!(items(r#"{"input":"one"}"#), ["\"one\""]);
    assert_eq!(items(r#"{"input":["a","b c"]}"#), ["\"a\"", "\"b c\""]);
    // Token ids: one input; token-id arrays: one input each.
    assert_eq!(items(r#"{"input":[1, 2,3]}"#), ["[1, 2,3]"]);
    assert_eq!(items(r#"{"input":[[1,2],[3]]}"#), ["[1,2]", "[3]"]);
    let f = scan(r#"{"input":[[1,2],[3]]}"#);
    assert_eq!(inputs(br#"{"input":[[1,2],[3]]}"#, f.input.as_ref().unwrap()).unwrap().tokens, [2, 1]);
    for bad in [
        r#"{"input":[""]}"#,
        r#"{"input":["a",""]}"#,
        r#"{"input":[[]]}"#,
        r#"{"input":[{"x":1}]}"#,
        r#"{"input":[1,"a"]}"#,
        r#"{"input":[[1,"a"]]}"#,
    ] {
        let f = scan(bad);
        let e = inputs(bad.as_bytes(), f.input.as_ref().unwrap()).unwrap_err();
        assert_eq!((e.status.as_u16(), e.param), (400, Some("input")), "{bad}");
    }
}

#[test]
fn batches_hold_every_input_once_in_order_within_both_limits() {
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..2000 {
        let s = settings(rng.usize(1..6), rng.u64(1..40));
        let tokens: Vec<u64> = (0..rng.usize(1..40)).map(|_| rng.u64(1..20)).collect();
        let b = batches(&s, &tokens);
        assert_eq!(b.first().unwrap().start, 0);
        assert_eq!(b.last().unwrap().end, tokens.len());
        for w in b.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        for r in &b {
            assert!(!r.is_empty() && r.len() <= s.max_inputs);
            let sum: u64 = tokens[r.clone()].iter().sum();
            assert!(sum <= s.max_tokens || r.len() == 1, "{r:?} {sum} > {}", s.max_tokens);
        }
    }
}

#[test]
fn a_request_that_fits_and_wants_what_the_upstream_gives_is_left_alone() {
    let body = r#"{"model":"m","input":["a","b","c"]}"#;
    assert!(plan(&settings(3, 100), body.as_bytes(), &scan(body), None).unwrap().is_none());
    let w = plan(&settings(2, 100), body.as_bytes(), &scan(body), None).unwrap().unwrap();
    assert_eq!(w.batches, [0..2, 2..3]);
    // An upstream that only gives floats: a base64 client is converted, not split.
    let b64 = r#"{"model":"m","input":["a"],"encoding_format":"base64"}"#;
    let floats = Settings { base64: false, ..settings(3, 100) };
    let w = plan(&floats, b64.as_bytes(), &scan(b64), None).unwrap().unwrap();
    assert_eq!((w.wanted, w.ask, w.batches.len()), (Encoding::Base64, Encoding::Float, 1));
    let e = plan(
        &floats,
        br#"{"input":["a"],"encoding_format":"hex"}"#,
        &scan(r#"{"input":["a"],"encoding_format":"hex"}"#),
        None,
    );
    assert_eq!(e.err().unwrap().param, Some("encoding_format"));
}

#[test]
fn a_sub_request_keeps_the_client_s_members_with_its_share_of_the_input() {
    let body = r#"{"model":"m","input":["a","b","c"],"dimensions":8,"user":"u","encoding_format":"float"}"#;
    let s = Settings { upstream: Some(Encoding::Base64), ..settings(2, 100) };
    let w = plan(&s, body.as_bytes(), &scan(body), None).unwrap().unwrap();
    let first = String::from_utf8(sub_body(body.as_bytes(), &w, &w.batches[0])).unwrap();
    assert_eq!(first, r#"{"model":"m","dimensions":8,"user":"u","input":["a","b"],"encoding_format":"base64"}"#);
    let ids = r#"{"model":"m","input":[1,2,3]}"#;
    let w = plan(&s, ids.as_bytes(), &scan(ids), None).unwrap().unwrap();
    let one = String::from_utf8(sub_body(ids.as_bytes(), &w, &w.batches[0])).unwrap();
    assert_eq!(one, r#"{"model":"m","input":[1,2,3],"encoding_format":"base64"}"#);
}

fn round_trip(f: f32) {
    let mut text = Vec::new();
    text.push(b'[');
    text.extend_from_slice(ryu::Buffer::new().format_finite(f).as_bytes());
    text.push(b']');
    let (mut b64, mut scratch) = (Vec::new(), Vec::new());
    convert(&text, Encoding::Base64, &mut b64, &mut scratch).unwrap();
    let bytes = base64::engine::general_purpose::STANDARD.decode(&b64[1..b64.len() - 1]).unwrap();
    assert_eq!(bytes, f.to_le_bytes(), "{f:e} through float text to base64");
    let mut back = Vec::new();
    convert(&b64, Encoding::Float, &mut back, &mut scratch).unwrap();
    let parsed: f32 = std::str::from_utf8(&back[1..back.len() - 1]).unwrap().parse().unwrap();
    assert_eq!(parsed.to_bits(), f.to_bits(), "{f:e} through base64 to float text");
    assert_eq!(back, text, "the shortest form, both ways");
}

#[test]
fn conversion_is_exact_for_every_f32_json_can_carry() {
    for f in [
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        1e-45,
        -1e-45,
        1.1754942e-38,
        0.1,
        1.0 / 3.0,
    ] {
        round_trip(f);
    }
    let mut rng = fastrand::Rng::with_seed(11);
    let mut n = 0;
    while n < 200_000 {
        let f = f32::from_bits(rng.u32(..));
        if f.is_finite() {
            round_trip(f);
            n += 1;
        }
    }
    // Numbers printed as f64 (some servers do) read as the nearest f32: the same bits.
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    convert(b"[0.10000000149011612, -2.5E-3, 3]", Encoding::Base64, &mut out, &mut scratch).unwrap();
    let bytes = base64::engine::general_purpose::STANDARD.decode(&out[1..out.len() - 1]).unwrap();
    let want: Vec<u8> = [0.1f32, -2.5e-3, 3.0].iter().flat_map(|f| f.to_le_bytes()).collect();
    assert_eq!(bytes, want);
    // What JSON cannot carry is refused, not written.
    let nan = base64::engine::general_purpose::STANDARD.encode(f32::NAN.to_le_bytes());
    assert!(convert(format!("\"{nan}\"").as_bytes(), Encoding::Float, &mut out, &mut scratch).is_err());
    assert!(convert(b"\"AAA=\"", Encoding::Float, &mut out, &mut scratch).is_err());
    assert!(convert(b"[1,\"x\"]", Encoding::Base64, &mut out, &mut scratch).is_err());
}

fn answer(vectors: &[(usize, &str)], prompt: u64) -> bytes::Bytes {
    let data: Vec<String> =
        vectors.iter().map(|(i, v)| format!(r#"{{"object":"embedding","embedding":{v},"index":{i}}}"#)).collect();
    format!(
        r#"{{"object":"list","data":[{}],"model":"emb-1","usage":{{"prompt_tokens":{prompt},"total_tokens":{prompt}}}}}"#,
        data.join(",")
    )
    .into()
}

#[test]
fn parts_merge_in_the_client_s_order_whatever_order_they_list_their_items_in() {
    let one = part(answer(&[(1, "[2.5]"), (0, "[1.5]")], 3), 2, "c").unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(4.0f32.to_le_bytes());
    let two = part(answer(&[(0, &format!("\"{b64}\""))], 4), 1, "c").unwrap();
    let inputs = Inputs { items: vec![0..1, 1..2, 2..3], tokens: vec![1; 3] };
    let work = Work {
        inputs,
        sent: vec![0, 1, 2],
        batches: vec![0..2, 2..3],
        wanted: Encoding::Float,
        ask: Encoding::Float,
        cached: None,
        model: String::new(),
        coalesce: false,
        head: b"{".to_vec(),
    };
    let (out, usage) = merge(&[one, two], &work, "c").unwrap();
    let out = out.concat();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let got: Vec<(u64, f64)> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["index"].as_u64().unwrap(), d["embedding"][0].as_f64().unwrap()))
        .collect();
    assert_eq!(got, [(0, 1.5), (1, 2.5), (2, 4.0)]);
    assert_eq!((v["model"].as_str(), v["usage"]["prompt_tokens"].as_u64(), usage.prompt), (Some("emb-1"), Some(7), 7));
    // Holes, repeats and extras are the upstream's fault: an error, never a list with a hole.
    for bad in [answer(&[(0, "[1]")], 1), answer(&[(0, "[1]"), (0, "[2]")], 1), answer(&[(0, "[1]"), (2, "[2]")], 1)] {
        let e = part(bad, 2, "c").err().unwrap();
        assert_eq!(e.kind, Kind::UpstreamMalformed);
    }
}

#[test]
fn settings_are_checked_with_the_key_and_line() {
    let e = |t: &str| crate::config::Config::parse(t, &|_: &str| None).err().unwrap().0;
    let conn = "[connections.c]\napi_type = \"openai\"\napi_key = \"k\"\n[connections.c.embeddings]\n";
    assert!(e(&format!("{conn}max_inputs = 0\n")).starts_with("connections.c.embeddings.max_inputs (line 5)"));
    assert!(e(&format!("{conn}parallel = -1\n")).starts_with("connections.c.embeddings.parallel (line 5)"));
    assert!(e(&format!("{conn}max_concurrent = 0\n")).starts_with("connections.c.embeddings.max_concurrent (line 5)"));
    assert!(e(&format!("{conn}encodings = [\"hex\"]\n")).contains("`hex` is not `float` or `base64`"));
    assert!(e(&format!("{conn}encodings = []\n")).contains("at least one"));
    assert!(e(&format!("{conn}encodings = [\"float\"]\nupstream_encoding = \"base64\"\n")).contains("cannot return it"));
    assert!(e(&format!("{conn}queue_timeout_ms = 5\n")).contains("only used with `max_concurrent`"));
    assert!(e(&format!("{conn}batch_max_inputs = 5\n")).contains("only used with `batch_window_us` > 0"));
    assert!(
        e(&format!("{conn}batch_window_us = -1\n")).starts_with("connections.c.embeddings.batch_window_us (line 5)")
    );
    assert!(e(&format!("{conn}cache = true\n")).contains("unknown field"));
    assert!(e("[embeddings_cache]\nmax_mb = 0\n").starts_with("embeddings_cache.max_mb (line 2)"));
    assert!(e("[embeddings_cache]\nttl_secs = 0\n").starts_with("embeddings_cache.ttl_secs (line 2)"));
    let a =
        e("[connections.a]\napi_type = \"anthropic\"\napi_key = \"k\"\n[connections.a.embeddings]\nmax_inputs = 2\n");
    assert!(a.contains("not anthropic"), "{a}");
}

#[test]
fn cached_vectors_fill_their_indexes_and_only_misses_go_upstream() {
    let cache = Arc::new(Cache::new(16, 3600));
    let body = r#"{"model":"m","input":["a","b","c"],"dimensions":2}"#;
    let s = settings(2048, 1_000_000);
    let first = plan(&s, body.as_bytes(), &scan(body), Some((&cache, "conn", "up-m"))).unwrap().unwrap();
    assert_eq!((first.sent.clone(), first.cache_counts()), (vec![0, 1, 2], Some((0, 3))));
    let part1 = part(answer(&[(0, "[1.0]"), (1, "[2.0]"), (2, "[3.0]")], 3), 3, "c").unwrap();
    merge(&[part1], &first, "c").unwrap();
    // "b" and "c" are now cached; "d" is new; "dimensions" is part of the key.
    let body2 = r#"{"model":"m","input":["d","c","b"],"dimensions":2,"encoding_format":"base64"}"#;
    let second = plan(&s, body2.as_bytes(), &scan(body2), Some((&cache, "conn", "up-m"))).unwrap().unwrap();
    assert_eq!((second.sent.clone(), second.cache_counts()), (vec![0], Some((2, 1))));
    assert_eq!(
        String::from_utf8(sub_body(body2.as_bytes(), &second, &second.batches[0])).unwrap(),
        r#"{"model":"m","dimensions":2,"input":["d"],"encoding_format":"base64"}"#
    );
    let part2 = part(answer(&[(0, "[4.0]")], 1), 1, "c").unwrap();
    let (out, usage) = merge(&[part2], &second, "c").unwrap();
    let out = out.concat();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let got: Vec<f32> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let b = base64::engine::general_purpose::STANDARD.decode(d["embedding"].as_str().unwrap()).unwrap();
            f32::from_le_bytes(b[..4].try_into().unwrap())
        })
        .collect();
    assert_eq!(got, [4.0, 3.0, 2.0]);
    assert_eq!(usage.prompt, 1, "usage counts what went upstream");
    let other = r#"{"model":"m","input":["b"],"dimensions":3}"#;
    let third = plan(&s, other.as_bytes(), &scan(other), Some((&cache, "conn", "up-m"))).unwrap().unwrap();
    assert_eq!(third.cache_counts(), Some((0, 1)), "other dimensions, other vectors");
    let all = r#"{"model":"m","input":["a","b"],"dimensions":2,"user":"someone else"}"#;
    let fourth = plan(&s, all.as_bytes(), &scan(all), Some((&cache, "conn", "up-m"))).unwrap().unwrap();
    assert!(fourth.batches.is_empty() && fourth.cache_counts() == Some((2, 0)), "all hits: nothing goes upstream");
}

#[test]
fn the_one_pass_reader_agrees_with_a_json_parser_on_random_lists() {
    let mut rng = fastrand::Rng::with_seed(13);
    let sp = |rng: &mut fastrand::Rng| [" ", "", "\n  ", "\t"][rng.usize(..4)];
    for _ in 0..3000 {
        let n = rng.usize(0..6);
        let mut order: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut order);
        let mut items = Vec::new();
        let mut want = Vec::new();
        for &i in &order {
            let v: Vec<f32> = (0..rng.usize(1..5)).map(|_| f32::from_bits(rng.u32(..0x7f00_0000))).collect();
            let emb = if rng.bool() {
                serde_json::to_string(&v).unwrap()
            } else {
                format!(
                    "\"{}\"",
                    base64::engine::general_purpose::STANDARD
                        .encode(v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>())
                )
            };
            let mut members = vec![
                format!("\"object\":{}\"embedding\"", sp(&mut rng)),
                format!("\"index\":{}{i}", sp(&mut rng)),
                format!("\"embedding\":{}{emb}", sp(&mut rng)),
            ];
            if rng.bool() {
                members.push("\"extra\":{\"a\":[1,{\"b\":\"]\"}]}".into());
            }
            rng.shuffle(&mut members);
            items.push(format!("{{{}}}", members.join(&format!(",{}", sp(&mut rng)))));
            want.push((i as u64, emb));
        }
        let mut top = vec![
            format!("\"data\":{}[{}]", sp(&mut rng), items.join(",")),
            "\"model\":\"m\"".to_owned(),
            "\"usage\":{\"prompt_tokens\":3,\"total_tokens\":3}".to_owned(),
            "\"object\":\"list\"".to_owned(),
        ];
        rng.shuffle(&mut top);
        let body = format!("{}{{{}}}{}", sp(&mut rng), top.join(","), sp(&mut rng));
        serde_json::from_str::<serde_json::Value>(&body).expect("the test writes JSON");
        let list = quick(body.as_bytes()).unwrap_or_else(|| panic!("{body}"));
        let got: Vec<(u64, String)> = list.items.iter().map(|(i, r)| (*i, body[r.clone()].to_owned())).collect();
        assert_eq!(got, want, "{body}");
        assert_eq!(&body[list.model.unwrap()], "\"m\"");
        let part = part(body.clone().into(), n, "c").unwrap();
        assert_eq!(part.prompt, 3);
    }
    // The unusual goes to the validating reader.
    for odd in [
        r#"{"d\u0061ta":[]}"#,
        r#"{"data":[{"index":0,"embedding":[[1]]}]}"#,
        r#"{"data":[] "model":1}"#,
        r#"{"model":"m"}"#,
    ] {
        assert!(quick(odd.as_bytes()).is_none(), "{odd}");
    }
    assert_eq!(part(r#"{"d\u0061ta":[{"index":0,"embedding":[1]}]}"#.into(), 1, "c").unwrap().vectors.len(), 1);
}
