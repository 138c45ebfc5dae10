// Exercise 6: a new rule-based reward, DAPO's soft overlong punishment.
// This file replaces overlong_penalty in data/rewards.h. Check it with `make exercise 6`.

// The penalty of a response of `tokens` tokens when responses are cut at max_tokens: 0 while it leaves at least
// `cache` tokens before the cut, then falling linearly to -1 at max_tokens, and -1 beyond.
inline double overlong_penalty(long tokens, long max_tokens, long cache) {
    // your code here
    return 0.0;
}
