// The original Spring chat page's script. The connection, the subscription, the send form and the
// unread-message pull are as the original has them: only the server behind them changed (see README.md).
var stompClient = null;

function setConnected(connected) {
    $("#connect").prop("disabled", connected);
    $("#disconnect").prop("disabled", !connected);
    if (connected) {
        $("#conversation").show();
    }
    else {
        $("#conversation").hide();
    }
    $("#response").html("");
}

function connect() {
    var socket = new SockJS('/chat-websocket');
    stompClient = Stomp.over(socket);
    stompClient.connect({}, function (frame) {
        setConnected(true);
        console.log('Connected: ' + frame);
        stompClient.subscribe('/user/topic/reply', function (message) {
            showResponse(JSON.parse(message.body).content);
        });
        pullUnreadMessage('/topic/reply');
    });
}

function disconnect() {
    if (stompClient !== null) {
        stompClient.disconnect();
    }
    setConnected(false);
    console.log("Disconnected");
}

function sendMessage() {
    $.ajax({
        url: "/wsTemplate/sendToUser",
        type: "POST",
        async: true,
        data: {
            "receiver": $("#receiver").val(),
            "msg": $("#msg").val()
        },
        success: function (data) {
        },
        // Not in the original: a refused send shows up in the console instead of nowhere.
        error: function (xhr) {
            console.log("sendToUser failed: " + xhr.status + " " + xhr.responseText);
        }
    });
}

function pullUnreadMessage(destination) {
    $.ajax({
        url: "/wsTemplate/pullUnreadMessage",
        type: "POST",
        dataType: "json",
        async: true,
        data: {
            "destination": destination
        },
        success: function (data) {
            if (data.result != null) {
                $.each(data.result, function (i, item) {
                    showResponse(JSON.parse(item).content);
                });
            } else if (data.code != null && data.code == "500") {
                alert(data.msg);
            }
        }
    });
}

function showResponse(message) {
    // .text(), not string concatenation into HTML: a message is another user's input.
    $("#response").append($("<tr>").append($("<td>").text(message)));
}

$(function () {
    $("form").on('submit', function (e) {
        e.preventDefault();
    });
    $("#connect").click(function () { connect(); });
    $("#disconnect").click(function () { disconnect(); });
    $("#send").click(function () { sendMessage(); });
});
