// Tests of json.h: round trips, escapes, exact integers, and errors that name the problem and its byte offset.
#include <doctest/doctest.h>

#include <string>

#include "../io/json.h"

TEST_SUITE("checkpoint") {
    TEST_CASE("json: nested values survive a round trip, compact and pretty") {
        Json config = Json::object();
        config["model_type"] = "deepseek_v3";
        config["hidden_size"] = 256;
        config["rms_norm_eps"] = 1e-6;
        config["q_lora_rank"] = Json();
        config["norm_topk_prob"] = true;
        config["rope_scaling"]["factor"] = 40;
        config["layers"].push_back(Json::array());
        config["layers"].push_back(Json::object());
        config["layers"].push_back(-0.125);

        for (int indent : {-1, 0, 2}) {
            Json back = Json::parse(config.dump(indent));
            CHECK(back == config);
            CHECK(back.dump() == config.dump());
        }
        CHECK(config.dump() ==
              R"({"model_type":"deepseek_v3","hidden_size":256,"rms_norm_eps":1e-06,"q_lora_rank":null,)"
              R"("norm_topk_prob":true,"rope_scaling":{"factor":40},"layers":[[],{},-0.125]})");
        CHECK(Json::parse("[1, {\"a\": []}]").dump(2) == "[\n  1,\n  {\n    \"a\": []\n  }\n]");
    }

    TEST_CASE("json: objects keep insertion order and look up by key") {
        Json j = Json::parse(R"({"zeta": 1, "alpha": 2, "mid": {"x": "y"}})");
        const Json::Object& members = j.as_object();
        REQUIRE(members.size() == 3);
        CHECK(members[0].first == "zeta");
        CHECK(members[1].first == "alpha");
        CHECK(members[2].first == "mid");
        CHECK(j.at("alpha").as_int() == 2);
        CHECK(j.at("mid").at("x").as_string() == "y");
        CHECK(j.contains("zeta"));
        CHECK_FALSE(j.contains("beta"));
        CHECK_THROWS_WITH_AS(j.at("beta"), doctest::Contains("missing key 'beta'"), std::runtime_error);

        j["alpha"] = 3;  // assigning to an existing key replaces its value in place
        CHECK(j.as_object().size() == 3);
        CHECK(j.dump() == R"({"zeta":1,"alpha":3,"mid":{"x":"y"}})");
    }

    TEST_CASE("json: string escapes are written and read correctly") {
        std::string tricky = "say \"hi\"\\ \n\t\r\b\f end\x01\x1f";
        Json j(tricky);
        CHECK(j.dump() == R"("say \"hi\"\\ \n\t\r\b\f end\u0001\u001f")");
        CHECK(Json::parse(j.dump()).as_string() == tricky);

        CHECK(Json::parse(R"("caf\u00e9")").as_string() == "caf\xc3\xa9");
        CHECK(Json::parse(R"("\u20ac")").as_string() == "\xe2\x82\xac");
        CHECK(Json::parse(R"("\ud83d\ude00")").as_string() == "\xf0\x9f\x98\x80");
        CHECK(Json::parse(R"("\/")").as_string() == "/");
        CHECK(Json("caf\xc3\xa9").dump() == "\"caf\xc3\xa9\"");  // UTF-8 is written as is
    }

    TEST_CASE("json: integers are written without a decimal point and stay exact up to 2^53") {
        CHECK(Json(42).dump() == "42");
        CHECK(Json(-7L).dump() == "-7");
        CHECK(Json(3.0).dump() == "3.0");  // a whole-valued double stays a float for typed readers
        CHECK(Json::parse("[1.0, 1, 1e3]").dump() == "[1.0,1,1000.0]");
        CHECK(Json(0.1).dump() == "0.1");
        CHECK(Json(1.5e300).dump() == "1.5e+300");

        long two_53 = 9007199254740992L;
        CHECK(Json(two_53).dump() == "9007199254740992");
        CHECK(Json::parse("9007199254740992").as_long() == two_53);
        CHECK(Json::parse("-9007199254740991").as_long() == -two_53 + 1);
        CHECK(Json::parse("123456789012").as_long() == 123456789012L);
        CHECK(Json(size_t(1) << 40).dump() == "1099511627776");
        CHECK(Json::parse("2.5e2").as_int() == 250);
        CHECK(Json::parse("-0.5").as_number() == -0.5);
    }

    TEST_CASE("json: malformed input throws with the byte offset of the problem") {
        CHECK_THROWS_WITH_AS(Json::parse(R"({"a":})"), doctest::Contains("unexpected character '}' at byte 5"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(Json::parse("[1,2"), doctest::Contains("unexpected end of input at byte 4"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(Json::parse(R"("abc)"), doctest::Contains("unterminated string starting at byte 0"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(Json::parse(R"({"a":1} x)"),
                             doctest::Contains("trailing characters after the value at byte 8"), std::runtime_error);
        CHECK_THROWS_WITH_AS(Json::parse(std::string(100, '[')), doctest::Contains("nesting deeper than 64 at byte 64"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(Json::parse(R"(["a\qb"])"), doctest::Contains("bad escape '\\q' at byte 3"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(Json::parse(R"("\u12G4")"), doctest::Contains("bad hex digit in \\u escape at byte 5"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(Json::parse(R"("\ud83d")"), doctest::Contains("unpaired high surrogate"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(Json::parse("\"a\nb\""),
                             doctest::Contains("unescaped control character in string at byte 2"), std::runtime_error);
        CHECK_THROWS_WITH_AS(Json::parse("012"), doctest::Contains("trailing characters after the value at byte 1"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(Json::parse("-"), doctest::Contains("expected a digit in number at byte 1"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(Json::parse("[1,]"), doctest::Contains("unexpected character ']' at byte 3"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(Json::parse("{1:2}"), doctest::Contains("unexpected character '1' at byte 1"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(Json::parse("tru"), doctest::Contains("unexpected character 't' at byte 0"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(Json::parse(""), doctest::Contains("unexpected end of input at byte 0"),
                             std::runtime_error);
        CHECK_NOTHROW(Json::parse(std::string(64, '[') + std::string(64, ']')));
    }

    TEST_CASE("json: getters of the wrong type throw naming the expected type") {
        Json j = Json::parse(R"({"n": 1.5, "s": "text", "a": [1], "b": false, "z": null})");
        CHECK_THROWS_WITH_AS(j.at("s").as_number(), doctest::Contains("expected number, found string"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(j.at("n").as_string(), doctest::Contains("expected string, found number"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(j.at("a").as_object(), doctest::Contains("expected object, found array"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(j.at("z").as_bool(), doctest::Contains("expected bool, found null"), std::runtime_error);
        CHECK_THROWS_WITH_AS(j.at("b").as_array(), doctest::Contains("expected array, found bool"), std::runtime_error);
        CHECK_THROWS_WITH_AS(j.at("n").as_int(), doctest::Contains("expected an integer"), std::runtime_error);
        CHECK_THROWS_WITH_AS(Json(3e9).as_int(), doctest::Contains("expected an integer"), std::runtime_error);
        CHECK_THROWS_WITH_AS(j.at("a").at("x"), doctest::Contains("expected object, found array"), std::runtime_error);
        CHECK_THROWS_WITH_AS(j["s"].push_back(1), doctest::Contains("expected array, found string"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(j["n"]["key"], doctest::Contains("expected object, found number"), std::runtime_error);
        CHECK(j.at("z").is_null());
        CHECK_FALSE(j.at("b").as_bool());
    }
}
