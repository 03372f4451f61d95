use super::*;

fn op(client: u64, call: u64, ret: Option<u64>, input: Input, output: Option<Output>) -> Operation {
    Operation { client, key: b"k".to_vec(), call, ret, input, output }
}

fn put(value: &str) -> Input {
    Input::Put(value.as_bytes().to_vec())
}

fn read(value: Option<&str>) -> Option<Output> {
    Some(Output::Value(value.map(|value| value.as_bytes().to_vec())))
}

fn ok() -> Option<Output> {
    Some(Output::Ok)
}

fn is_linearizable(history: &[Operation]) -> bool {
    match check(history) {
        Verdict::Linearizable => true,
        Verdict::NotLinearizable { .. } => false,
        Verdict::Unknown { reason, .. } => panic!("search gave up: {reason}"),
    }
}

#[test]
fn hand_written_histories() {
    let cases: Vec<(&str, Vec<Operation>, bool)> = vec![
        (
            "read after write sees it",
            vec![op(1, 0, Some(1), put("a"), ok()), op(2, 2, Some(3), Input::Get, read(Some("a")))],
            true,
        ),
        (
            "stale read after an acknowledged write",
            vec![op(1, 0, Some(1), put("a"), ok()), op(2, 2, Some(3), Input::Get, read(None))],
            false,
        ),
        (
            "concurrent read may see the old value",
            vec![op(1, 0, Some(10), put("a"), ok()), op(2, 1, Some(2), Input::Get, read(None))],
            true,
        ),
        (
            "concurrent read may see the new value",
            vec![op(1, 0, Some(10), put("a"), ok()), op(2, 1, Some(2), Input::Get, read(Some("a")))],
            true,
        ),
        (
            "lost update: a later read sees an overwritten value",
            vec![
                op(1, 0, Some(1), put("a"), ok()),
                op(1, 2, Some(3), put("b"), ok()),
                op(2, 4, Some(5), Input::Get, read(Some("a"))),
            ],
            false,
        ),
        (
            "timed-out write may have applied",
            vec![op(1, 0, None, put("a"), None), op(2, 5, Some(6), Input::Get, read(Some("a")))],
            true,
        ),
        (
            "timed-out write may not have applied",
            vec![op(1, 0, None, put("a"), None), op(2, 5, Some(6), Input::Get, read(None))],
            true,
        ),
        (
            "a value cannot vanish once read",
            vec![
                op(1, 0, None, put("a"), None),
                op(2, 5, Some(6), Input::Get, read(Some("a"))),
                op(2, 7, Some(8), Input::Get, read(None)),
            ],
            false,
        ),
        (
            "two concurrent creates cannot both succeed",
            vec![
                op(
                    1,
                    0,
                    Some(5),
                    Input::Cas { expected: None, new: Some(b"x".to_vec()) },
                    Some(Output::CasResult(true)),
                ),
                op(
                    2,
                    1,
                    Some(6),
                    Input::Cas { expected: None, new: Some(b"y".to_vec()) },
                    Some(Output::CasResult(true)),
                ),
            ],
            false,
        ),
        (
            "one concurrent create wins",
            vec![
                op(
                    1,
                    0,
                    Some(5),
                    Input::Cas { expected: None, new: Some(b"x".to_vec()) },
                    Some(Output::CasResult(true)),
                ),
                op(
                    2,
                    1,
                    Some(6),
                    Input::Cas { expected: None, new: Some(b"y".to_vec()) },
                    Some(Output::CasResult(false)),
                ),
                op(3, 7, Some(8), Input::Get, read(Some("x"))),
            ],
            true,
        ),
        (
            "delete then read absent",
            vec![
                op(1, 0, Some(1), put("a"), ok()),
                op(1, 2, Some(3), Input::Delete, ok()),
                op(2, 4, Some(5), Input::Get, read(None)),
            ],
            true,
        ),
    ];
    for (name, history, expected) in cases {
        assert_eq!(is_linearizable(&history), expected, "{name}");
    }
}

#[test]
fn violations_name_the_key() {
    let mut history = vec![op(1, 0, Some(1), put("a"), ok())];
    history.push(Operation { key: b"other".to_vec(), ..op(2, 0, Some(1), put("z"), ok()) });
    history.push(Operation { key: b"other".to_vec(), ..op(2, 2, Some(3), Input::Get, read(Some("nope"))) });
    match check(&history) {
        Verdict::NotLinearizable { key, explanation } => {
            assert_eq!(key, b"other".to_vec());
            assert!(explanation.contains("could not place"), "{explanation}");
            // Readable: values as text, the placed order and the operation left over.
            assert!(explanation.contains(r#"put("z") = ok"#), "{explanation}");
            assert!(
                explanation.contains(r#"client 2 [0.000002ms .. 0.000003ms] "other" get = "nope""#),
                "{explanation}"
            );
        }
        other => panic!("expected a violation, got {other:?}"),
    }
}

#[test]
fn unknown_outcomes_display_as_such() {
    let op = Operation {
        client: 7,
        key: b"k".to_vec(),
        call: 1_500_000,
        ret: None,
        input: Input::Cas { expected: None, new: Some(b"v".to_vec()) },
        output: None,
    };
    assert_eq!(op.to_string(), r#"client 7 [1.500000ms .. ?] "k" cas(absent -> "v") = ? (unknown outcome)"#);
}

/// A random sequential run of the model, with each operation's call/return interval
/// stretched around its linearization point: always linearizable. Changing one read's
/// result to a value never written makes it non-linearizable.
#[test]
fn histories_of_the_model_pass_and_a_corrupted_read_fails() {
    bolero::check!().with_type::<Vec<(u8, u8, u8, u8)>>().with_iterations(300).for_each(|steps| {
        let mut state: Option<Vec<u8>> = None;
        let mut history = Vec::new();
        for (position, (kind, value, before, after)) in steps.iter().take(40).enumerate() {
            let point = (position as u64 + 2) * 100;
            let input = match kind % 4 {
                0 => Input::Put(vec![*value % 3]),
                1 => Input::Delete,
                2 => Input::Get,
                _ => Input::Cas { expected: Some(vec![*value % 3]), new: Some(vec![(*value % 3 + 1) % 3]) },
            };
            let output = match &input {
                Input::Put(new) => {
                    state = Some(new.clone());
                    Output::Ok
                }
                Input::Delete => {
                    state = None;
                    Output::Ok
                }
                Input::Get => Output::Value(state.clone()),
                Input::Cas { expected, new } => {
                    let applies = state == *expected;
                    if applies {
                        state = new.clone();
                    }
                    Output::CasResult(applies)
                }
            };
            // Intervals overlap neighbours but always contain the linearization point.
            let call = point - u64::from(*before % 150);
            let ret = point + u64::from(*after % 150);
            history.push(Operation {
                client: position as u64,
                key: b"k".to_vec(),
                call,
                ret: Some(ret),
                input,
                output: Some(output),
            });
        }
        assert!(is_linearizable(&history), "a run of the model itself must pass: {history:?}");
        if let Some(read) = history.iter_mut().find(|op| op.input == Input::Get) {
            read.output = Some(Output::Value(Some(b"never written".to_vec())));
            assert!(!is_linearizable(&history), "a read of a value nobody wrote must fail");
        }
    });
}
